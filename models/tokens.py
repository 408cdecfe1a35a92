"""Texts to model inputs: tokenization with the model's prefixes and `max_length`, padding a group of token id
lists, and cutting length-sorted texts into chunks by a token budget. Small picklable objects, so DataLoader
workers and dataset-preparation processes do this without the model."""
import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

CHARS_PER_TOKEN = 6  # a prefix of this many characters per token nearly always holds more tokens than are kept
# tokenizer parts that never join characters across a space (normalizers act per character; pre-tokenizers split
# there; models act on each piece alone): a text's tokens before a space do not depend on what follows it
_PER_CHARACTER = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip", "Prepend"}
_SPLIT_AT_SPACES = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "ByteLevel", "Metaspace"}
_SPLIT_FURTHER = {"Punctuation", "Digits"}
_PER_PIECE = {"WordPiece", "WordLevel", "BPE", "Unigram"}


@dataclass(frozen=True)
class TextTokenizer:
    """The model's tokenizer with its prefixes and `max_length` (which `BiEncoder.settings` holds); `append_eos`:
    every text ends with the EOS token, appended where the tokenizer does not end it so, kept when a text is cut at
    `max_length` (the last token of last-token pooling)."""

    tokenizer: object
    max_length: int
    query_prefix: str = ""
    document_prefix: str = ""
    append_eos: bool = False

    def with_prompt(self, kind: str, prompt: str | None) -> "TextTokenizer":
        """This tokenizer with `prompt` as the prefix of `kind` texts (itself when `prompt` is None)."""
        return self if prompt is None else dataclasses.replace(self, **{f"{kind}_prefix": prompt})

    def prefixed(self, texts: Sequence[str], kind: str) -> list[str]:
        prefix = self.query_prefix if kind == "query" else self.document_prefix
        return [prefix + t for t in texts] if prefix else list(texts)

    def ids(self, texts: Sequence[str], kind: str) -> list[list[int]]:
        """Token ids with the kind's prefix and special tokens, truncated at `max_length`, unpadded."""
        if not texts:
            return []
        ids = self.tokenizer(self.prefixed(texts, kind), truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return [self._ending_with_eos(x)[0] for x in ids] if self.append_eos else ids

    def lengths(self, texts: Sequence[str], kind: str) -> list[int]:
        """Tokens in each text with the kind's prefix and special tokens, before truncation."""
        if not texts:
            return []
        ids = self.tokenizer(self.prefixed(texts, kind), truncation=False, verbose=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return [len(x) + (self.append_eos and (not x or x[-1] != eos)) for x in ids]

    def ids_and_truncated(self, texts: Sequence[str], kind: str) -> tuple[list[list[int]], list[bool]]:
        """`ids`, and whether each text is longer than `max_length` tokens, encoding little more than is kept.

        Where the fast tokenizer never looks across a space (`space_bounded`), a long text is encoded only up to the
        first space past `CHARS_PER_TOKEN` characters per token: the words before that space get the tokens they
        get in the whole text, so when the prefix is itself truncated, its ids are the whole text's. Prefixes that
        are not, and texts of other tokenizers, are encoded whole. Truncation is the tokenizer's own.
        """
        if self._truncating is None:
            return self.ids(texts, kind), [n > self.max_length for n in self.lengths(texts, kind)]
        backend, bounded = self._truncating
        texts = self.prefixed(texts, kind)
        pieces = [_before_space(t, CHARS_PER_TOKEN * self.max_length) for t in texts] if bounded else texts
        encodings = backend.encode_batch(pieces)
        whole = [i for i, e in enumerate(encodings) if not e.overflowing and len(pieces[i]) < len(texts[i])]
        for i, e in zip(whole, backend.encode_batch([texts[i] for i in whole])):
            encodings[i] = e
        if not self.append_eos:
            return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]
        ended = [self._ending_with_eos(e.ids) for e in encodings]
        return [ids for ids, _ in ended], [bool(e.overflowing) or cut for e, (_, cut) in zip(encodings, ended)]

    def _ending_with_eos(self, ids: list[int]) -> tuple[list[int], bool]:
        """`ids` ending with the EOS token (appended, in place of the last token when `max_length` are there), and
        whether a token gave way to it."""
        eos = self.tokenizer.eos_token_id
        if ids and ids[-1] == eos:
            return ids, False
        return ids[:self.max_length - 1] + [eos], len(ids) >= self.max_length

    @cached_property
    def _truncating(self) -> tuple[object, bool] | None:
        """A copy of the fast tokenizer that truncates at `max_length` and never pads (its own settings, made once),
        and whether it is `space_bounded`; None for other tokenizers."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        rules = backend.to_str()
        backend = backend.__class__.from_str(rules)
        backend.enable_truncation(self.max_length, direction=self.tokenizer.truncation_side)
        backend.no_padding()
        return backend, _space_bounded(rules, self.tokenizer.truncation_side)

    def fingerprint(self) -> str:
        """Hash of everything that decides the token ids: vocabulary and rules, prefixes, `max_length`, `append_eos`."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # its truncation and padding state changes with every call: not part of the rules
            rules = json.dumps({k: v for k, v in json.loads(backend.to_str()).items()
                                if k not in ("truncation", "padding")}, sort_keys=True)
        else:
            rules = repr(sorted(self.tokenizer.get_vocab().items()))
        h = hashlib.sha256(f"{type(self.tokenizer).__name__}|{self.max_length}|{self.query_prefix!r}|"
                           f"{self.document_prefix!r}|{'append_eos|' if self.append_eos else ''}".encode())
        h.update(rules.encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Padder:
    """Pads lists of token ids into the tensors the encoder takes, as the tokenizer's own padding would; or, `packed`,
    concatenates them into one row without padding (`models.unpad`).

    Small and picklable, so DataLoader workers can pad without the model.
    """

    pad_id: int
    left: bool = False  # the tokenizer's padding_side is "left"
    token_type_ids: bool = True  # the encoder takes token_type_ids (all zero for one sequence)
    multiple: int = 1  # widths round up to a multiple of this (`models.runtime.pad_multiple`)...
    max_width: int | None = None  # ...but not past this (the model's max_length) unless the longest is longer
    packed: bool = False  # one row of the texts without padding: each text costs its own tokens
    first_position: int = 0  # packed: the position id of each text's first token (`models.unpad.first_position`)

    @classmethod
    def for_tokenizer(cls, tokenizer, multiple: int = 1, max_width: int | None = None, packed: bool = False,
                      first_position: int = 0) -> "Padder":
        return cls(int(tokenizer.pad_token_id or 0), tokenizer.padding_side == "left",
                   "token_type_ids" in tokenizer.model_input_names, multiple, max_width, packed, first_position)

    def padded(self) -> "Padder":
        """This padder padding, not packing (for encoders that take padded inputs only: ONNX, int8 copies)."""
        return dataclasses.replace(self, packed=False, first_position=0)

    def width(self, longest: int) -> int:
        """The padded width of a group whose longest text has `longest` tokens (packed: `longest`)."""
        if self.packed:
            return longest
        rounded = -(-longest // self.multiple) * self.multiple
        return max(longest, min(rounded, self.max_width)) if self.max_width else rounded

    def __call__(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        if self.packed:
            return self.pack(ids, lengths)
        width = self.width(int(lengths.max())) if len(ids) else 0
        positions = np.arange(width)
        mask = positions >= width - lengths[:, None] if self.left else positions < lengths[:, None]
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        input_ids[mask] = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self.token_type_ids:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out

    def pack(self, ids: Sequence[Sequence[int]], lengths: np.ndarray) -> dict[str, torch.Tensor]:
        """The texts in one row [1, total] in their order: ids, positions restarting at `first_position` per text,
        token types (zero: one segment a text), `cu_seq_lens` [texts + 1] (int32, where each text starts, then the
        total) and `attention_mask` [texts, longest], each text's tokens from the left: what pooling reads."""
        total = int(lengths.sum())
        starts = np.concatenate([[0], np.cumsum(lengths)])
        input_ids = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=total)
        positions = np.arange(total) - np.repeat(starts[:-1], lengths) + self.first_position
        mask = np.arange(int(lengths.max()) if len(ids) else 0) < lengths[:, None]
        out = {"input_ids": torch.from_numpy(input_ids)[None], "position_ids": torch.from_numpy(positions)[None],
               "attention_mask": torch.from_numpy(mask.astype(np.int64)),
               "cu_seq_lens": torch.from_numpy(starts.astype(np.int32))}
        if self.token_type_ids:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out


def ends_with_eos(tokenizer) -> bool:
    """Whether `tokenizer` ends a text with its EOS token."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a")["input_ids"][-1] == eos


def eos_appending_copy(tokenizer):
    """A copy of a fast tokenizer whose own post-processor also appends the EOS token (kept through truncation), so
    that tools that tokenize by the saved files alone (sentence-transformers, ONNX users) end texts with it too."""
    from tokenizers import processors

    eos = tokenizer.eos_token
    tokenizer = copy.deepcopy(tokenizer)
    backend = tokenizer.backend_tokenizer
    append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                           special_tokens=[(eos, tokenizer.eos_token_id)])
    backend.post_processor = append if backend.post_processor is None else \
        processors.Sequence([backend.post_processor, append])
    return tokenizer


def length_chunks(sorted_lengths: Sequence[int], token_budget: int, max_texts: int | None = None,
                  packed: bool = False) -> list[int]:
    """Sizes of consecutive chunks of texts sorted longest first, each padded to its first (longest) text, or
    `packed` (no padding).

    A chunk grows while its tokens (texts x its longest; packed: the sum of its texts' lengths) stay within
    `token_budget` and it holds at most `max_texts` texts; a text longer than the budget gets a chunk of its own.
    The sizes sum to the number of texts.
    """
    sizes, start, n = [], 0, len(sorted_lengths)
    cumulative = np.cumsum(np.maximum(1, np.asarray(sorted_lengths, dtype=np.int64)))
    while start < n:
        if packed:
            before = int(cumulative[start - 1]) if start else 0
            fits = int(np.searchsorted(cumulative, before + token_budget, side="right")) - start
        else:
            fits = token_budget // max(1, int(sorted_lengths[start]))
        size = max(1, min(n - start, fits, max_texts or n))
        sizes.append(size)
        start += size
    return sizes


def space_bounded(tokenizer) -> bool:
    """Whether a fast tokenizer's tokens of the words before a space (that follows a non-space) never depend on the
    text after it: per-character normalization, pre-tokenization that splits at spaces, a model that encodes each
    piece alone, no added token holding a space, truncation on the right."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and _space_bounded(backend.to_str(), tokenizer.truncation_side)


def _space_bounded(rules: str, truncation_side: str) -> bool:
    """`space_bounded` from the tokenizer's JSON rules."""
    spec = json.loads(rules)
    normalizers, splitters = _steps(spec.get("normalizer")), _steps(spec.get("pre_tokenizer"))
    return (truncation_side == "right"
            and all(n["type"] in _PER_CHARACTER for n in normalizers)
            and any(p["type"] in _SPLIT_AT_SPACES for p in splitters)
            and all(p["type"] in _SPLIT_AT_SPACES | _SPLIT_FURTHER for p in splitters)
            and all(p.get("use_regex", True) and p.get("split", True) for p in splitters)
            and spec["model"]["type"] in _PER_PIECE and not spec["model"].get("dropout")
            and not any(any(c.isspace() for c in t["content"]) for t in spec.get("added_tokens", [])))


def _steps(node: dict | None) -> list[dict]:
    """A normalizer or pre-tokenizer spec as its list of steps (Sequences flattened)."""
    if node is None:
        return []
    if node["type"] != "Sequence":
        return [node]
    return [step for child in node.get("normalizers", node.get("pretokenizers", [])) for step in _steps(child)]


def _before_space(text: str, start: int) -> str:
    """`text` up to the first space at or after `start` that follows a non-space character (all of it if none)."""
    cut = text.find(" ", start)
    while cut > 0 and text[cut - 1].isspace():
        cut = text.find(" ", cut + 1)
    return text if cut <= 0 else text[:cut]
