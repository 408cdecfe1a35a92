"""Texts to model inputs: tokenization with the model's prefixes and `max_length`, padding a group of token id
lists, and cutting length-sorted texts into chunks by a token budget. Small picklable objects, so DataLoader
workers and dataset-preparation processes do this without the model."""
import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class TextTokenizer:
    """The model's tokenizer with its prefixes and `max_length` (which `BiEncoder.settings` holds)."""

    tokenizer: object
    max_length: int
    query_prefix: str = ""
    document_prefix: str = ""

    def prefixed(self, texts: Sequence[str], kind: str) -> list[str]:
        prefix = self.query_prefix if kind == "query" else self.document_prefix
        return [prefix + t for t in texts] if prefix else list(texts)

    def ids(self, texts: Sequence[str], kind: str) -> list[list[int]]:
        """Token ids with the kind's prefix and special tokens, truncated at `max_length`, unpadded."""
        if not texts:
            return []
        return self.tokenizer(self.prefixed(texts, kind), truncation=True, max_length=self.max_length,
                              return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def lengths(self, texts: Sequence[str], kind: str) -> list[int]:
        """Tokens in each text with the kind's prefix and special tokens, before truncation."""
        if not texts:
            return []
        ids = self.tokenizer(self.prefixed(texts, kind), truncation=False, verbose=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return [len(x) for x in ids]

    def ids_and_lengths(self, texts: Sequence[str], kind: str) -> tuple[list[list[int]], list[int]]:
        """`ids` and `lengths` in one tokenization pass: the fast tokenizer's encodings are truncated and given
        their special tokens as its own truncation would (other tokenizers: two passes)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.post_processor is None:
            return self.ids(texts, kind), self.lengths(texts, kind)
        backend = backend.__class__.from_str(backend.to_str())  # a copy: no truncation or padding state to share
        backend.no_truncation()
        backend.no_padding()
        special = backend.post_processor.num_special_tokens_to_add(False)
        ids, lengths = [], []
        for encoding in backend.encode_batch(self.prefixed(texts, kind), add_special_tokens=False):
            lengths.append(len(encoding) + special)
            encoding.truncate(max(0, self.max_length - special))
            ids.append(backend.post_process(encoding).ids)
        return ids, lengths

    def fingerprint(self) -> str:
        """Hash of everything that decides the token ids: vocabulary and rules, prefixes, `max_length`."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # its truncation and padding state changes with every call: not part of the rules
            rules = json.dumps({k: v for k, v in json.loads(backend.to_str()).items()
                                if k not in ("truncation", "padding")}, sort_keys=True)
        else:
            rules = repr(sorted(self.tokenizer.get_vocab().items()))
        h = hashlib.sha256(f"{type(self.tokenizer).__name__}|{self.max_length}|{self.query_prefix!r}|"
                           f"{self.document_prefix!r}|".encode())
        h.update(rules.encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Padder:
    """Pads lists of token ids into the tensors the encoder takes, as the tokenizer's own padding would.

    Small and picklable, so DataLoader workers can pad without the model.
    """

    pad_id: int
    left: bool = False  # the tokenizer's padding_side is "left"
    token_type_ids: bool = True  # the encoder takes token_type_ids (all zero for one sequence)
    multiple: int = 1  # widths round up to a multiple of this (`models.runtime.pad_multiple`)...
    max_width: int | None = None  # ...but not past this (the model's max_length) unless the longest is longer

    @classmethod
    def for_tokenizer(cls, tokenizer, multiple: int = 1, max_width: int | None = None) -> "Padder":
        return cls(int(tokenizer.pad_token_id or 0), tokenizer.padding_side == "left",
                   "token_type_ids" in tokenizer.model_input_names, multiple, max_width)

    def width(self, longest: int) -> int:
        """The padded width of a group whose longest text has `longest` tokens."""
        rounded = -(-longest // self.multiple) * self.multiple
        return max(longest, min(rounded, self.max_width)) if self.max_width else rounded

    def __call__(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        width = self.width(int(lengths.max())) if len(ids) else 0
        positions = np.arange(width)
        mask = positions >= width - lengths[:, None] if self.left else positions < lengths[:, None]
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        input_ids[mask] = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
        out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self.token_type_ids:
            out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        return out


def length_chunks(sorted_lengths: Sequence[int], token_budget: int, max_texts: int | None = None) -> list[int]:
    """Sizes of consecutive chunks of texts sorted longest first, each padded to its first (longest) text.

    A chunk grows while (texts x its longest) stays within `token_budget` and it holds at most `max_texts`
    texts; a text longer than the budget gets a chunk of its own. The sizes sum to the number of texts.
    """
    sizes, start, n = [], 0, len(sorted_lengths)
    while start < n:
        longest = max(1, int(sorted_lengths[start]))
        size = max(1, min(n - start, token_budget // longest, max_texts or n))
        sizes.append(size)
        start += size
    return sizes
