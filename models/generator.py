"""A query generator: a Hugging Face seq2seq (doc2query-style, e.g. a T5) or causal language model that writes search
queries for a document, as GPL (Wang et al. 2022) does to make training pairs from a corpus alone.

The model's input is `prompt` with `{text}` replaced by the document (title and text), the document cut to
`max_doc_tokens` tokens; queries are sampled (top-p) with `num_return_sequences`, a causal model's continuation
is cut at its first line break, and empty queries are dropped.
"""
import hashlib
import json
from pathlib import Path

import torch

from twinfold.models.bi_encoder import hash_tensors
from twinfold.models.loading import ModelLoadError, load_head_model

SEQ2SEQ_PROMPT = "{text}"  # doc2query models read the passage as it is
CAUSAL_PROMPT = "Passage: {text}\nA search query that this passage answers:"


def generator_kind(config) -> str | None:
    """seq2seq or causal for a transformers config whose architecture generates text; None otherwise."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    names = set(config.architectures or [])
    if names & set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()):
        return "seq2seq"
    if names & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "causal"
    return None


def check_settings(prompt: str | None, top_p: float) -> None:
    """`ValueError` naming the option for a prompt without exactly one `{text}` or a top-p outside (0, 1]."""
    if prompt is not None and prompt.count("{text}") != 1:
        raise ValueError(f"--prompt {prompt!r}: write {{text}} exactly once, where the document goes")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p: {top_p} must be in (0, 1]")


class QueryGenerator:
    """Writes queries for documents (`generate`) with a seq2seq or causal language model."""

    def __init__(self, model, tokenizer, kind: str, prompt: str | None = None, max_doc_tokens: int = 300,
                 max_new_tokens: int = 64, top_p: float = 0.95):
        check_settings(prompt, top_p)
        prompt = prompt or (SEQ2SEQ_PROMPT if kind == "seq2seq" else CAUSAL_PROMPT)
        self.model, self.tokenizer, self.kind = model.eval(), tokenizer, kind
        self.prompt, self.max_doc_tokens, self.max_new_tokens = prompt, max_doc_tokens, max_new_tokens
        self.top_p = top_p
        if kind == "causal":
            self.tokenizer.padding_side = "left"  # new tokens follow every prompt's last token
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False,
                        **settings) -> "QueryGenerator":
        """Load a folder or hub id (safetensors unless `allow_pickle`); a model that does not generate text raises
        `ModelLoadError` naming it. `settings`: the constructor's prompt and lengths."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        check_settings(settings.get("prompt"), settings.get("top_p", 1.0))

        def auto_class(config):
            kind = generator_kind(config)
            if kind is None:
                raise ModelLoadError(f"--generator {name_or_path}: not a generation model (config.json architectures "
                                     f"{config.architectures}: neither a seq2seq nor a causal language model)")
            return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM

        model, tokenizer, config = load_head_model(name_or_path, "generator", auto_class, allow_pickle,
                                                   trust_remote_code)
        return cls(model, tokenizer, generator_kind(config), **settings)

    def settings(self) -> dict:
        """What decides the queries besides the weights and the seed."""
        return {"kind": self.kind, "prompt": self.prompt, "max_doc_tokens": self.max_doc_tokens,
                "max_new_tokens": self.max_new_tokens, "top_p": self.top_p}

    def fingerprint(self) -> str:
        """Stable hash of the weights and the settings."""
        h = hashlib.sha256()
        hash_tensors(h, self.model.state_dict())
        h.update(json.dumps(self.settings(), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def model_input(self, text: str) -> str:
        """The prompt with the document cut to `max_doc_tokens` tokens (at a token's end in the original text)."""
        spans = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                               max_length=self.max_doc_tokens + 1)["offset_mapping"]
        if len(spans) > self.max_doc_tokens:
            text = text[:spans[self.max_doc_tokens - 1][1]]
        return self.prompt.replace("{text}", text)

    @torch.inference_mode()
    def generate(self, texts: list[str], per_text: int, seed: int) -> list[list[str]]:
        """`per_text` sampled queries for each text (fewer where some were empty), the same for the same seed."""
        batch = self.tokenizer([self.model_input(t) for t in texts], padding=True, return_tensors="pt")
        batch = {k: batch[k].to(self.model.device) for k in ("input_ids", "attention_mask")}  # no token types
        torch.manual_seed(seed)
        out = self.model.generate(**batch, do_sample=True, top_p=self.top_p, top_k=0,
                                  max_new_tokens=self.max_new_tokens, num_return_sequences=per_text,
                                  pad_token_id=self.tokenizer.pad_token_id)
        if self.kind == "causal":
            out = out[:, batch["input_ids"].shape[1]:]
        decoded = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        if self.kind == "causal":
            decoded = [q.strip().split("\n")[0] for q in decoded]
        queries = [" ".join(q.split()) for q in decoded]
        return [[q for q in queries[i * per_text:(i + 1) * per_text] if q] for i in range(len(texts))]
