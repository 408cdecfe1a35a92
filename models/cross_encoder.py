"""A cross-encoder teacher: a sequence-classification model with one output scores a (query, document) pair by its
logit. A sentence-transformers CrossEncoder folder is such a model; so is any `AutoModelForSequenceClassification`
folder or hub id with `num_labels` 1. Scores are the raw logits (no sigmoid), as distillation losses want them.
"""
import hashlib
import json
from pathlib import Path

import torch

from twinfold.models.bi_encoder import hash_tensors
from twinfold.models.loading import ModelLoadError, load_head_model


def is_cross_encoder(config) -> bool:
    """Whether a transformers config describes a sequence-classification model (what a cross-encoder is)."""
    return any(name.endswith("ForSequenceClassification") for name in config.architectures or [])


class CrossEncoder:
    """Scores (query, document) pairs with a one-output sequence-classification model (`score`)."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, max_length: int | None = None, allow_pickle: bool = False,
                        trust_remote_code: bool = False) -> "CrossEncoder":
        """Load a folder or hub id; weights from safetensors unless `allow_pickle`. `max_length` (tokens of a pair):
        default the tokenizer's limit, at most the model's positions. A model that is not a one-output
        sequence-classification model raises `ModelLoadError` naming it."""
        from transformers import AutoModelForSequenceClassification

        def auto_class(config):
            if not is_cross_encoder(config) or config.num_labels != 1:
                raise ModelLoadError(f"{name_or_path}: not a cross-encoder (a sequence-classification model with one "
                                     f"output); config.json has architectures {config.architectures} and "
                                     f"{config.num_labels} labels")
            return AutoModelForSequenceClassification

        model, tokenizer, config = load_head_model(name_or_path, "cross-encoder", auto_class, allow_pickle,
                                                   trust_remote_code)
        limits = [max_length, tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
        return cls(model, tokenizer, min(int(x) for x in limits if x is not None and x < 1e9))

    def fingerprint(self) -> str:
        """Stable hash of the weights and the pair length."""
        h = hashlib.sha256()
        hash_tensors(h, self.model.state_dict())
        h.update(json.dumps({"max_length": self.max_length}).encode())
        return h.hexdigest()[:16]

    @torch.inference_mode()
    def score(self, queries: list[str], documents: list[str], batch_size: int = 32) -> torch.Tensor:
        """The logit of each (queries[i], documents[i]) pair, float32; the pair is truncated to `max_length` tokens
        (longest part first)."""
        scores = []
        for start in range(0, len(queries), batch_size):
            batch = self.tokenizer(queries[start:start + batch_size], documents[start:start + batch_size],
                                   padding=True, truncation="longest_first", max_length=self.max_length,
                                   return_tensors="pt").to(self.model.device)
            scores.append(self.model(**batch).logits[:, 0].float())
        return torch.cat(scores) if scores else torch.empty(0)
