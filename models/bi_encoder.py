"""The Siamese bi-encoder: one shared Hugging Face encoder, pooling, L2 normalisation."""
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.atomic import atomic_directory
from models.loading import ModelLoadError, check_model_folder, read_sentence_transformers_settings
from models.pooling import POOLING_MODES, pool
from models.quantize import (COMPUTES, PRECISIONS, Int8Calibration, calibrate_int8, int8_linear_copy,
                             quantize_binary, quantize_int8)
from models.resolve import describe_attempts, resolve_model_path

TWINFOLD_FILE = "twinfold.json"
KINDS = ("query", "document")


@dataclass
class EncoderSettings:
    """Everything besides the weights that decides an embedding; stored in `twinfold.json`."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int | None = None
    query_prefix: str = ""
    document_prefix: str = ""
    matryoshka_dims: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {self.pooling!r} is not one of {', '.join(POOLING_MODES)}")


class BiEncoder(nn.Module):
    """A shared encoder for queries and documents: tokens -> pooled vector -> (optionally) unit length.

    `max_length` lives here and only here: `tokenize`, `encode` and training all read it.
    """

    def __init__(self, encoder: nn.Module, tokenizer, settings: EncoderSettings | None = None, info: dict | None = None):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.settings = settings or EncoderSettings()
        if self.settings.max_length is None:
            limits = [tokenizer.model_max_length, getattr(encoder.config, "max_position_embeddings", None)]
            self.settings.max_length = min(int(x) for x in limits if x is not None and x < 1e9)
        self.info = dict(info or {})
        # Parameters the pooled embedding never uses (BERT's pooler head) get no gradient; freezing them
        # keeps DDP from waiting for one.
        for name, param in encoder.named_parameters():
            if name.startswith("pooler."):
                param.requires_grad_(False)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        dropout: float | None = None,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> "BiEncoder":
        """Load a twinfold, sentence-transformers or plain Hugging Face folder (or hub id).

        Explicit arguments override what the folder stores. Weights load from safetensors only unless
        `allow_pickle`; custom model code runs only with `trust_remote_code`.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path)
        stored: dict = {}
        info: dict = {}
        if Path(path).is_dir():
            check_model_folder(Path(path), allow_pickle=allow_pickle)
            twinfold_file = Path(path) / TWINFOLD_FILE
            if twinfold_file.exists():
                saved = json.loads(twinfold_file.read_text())
                stored = {k: saved[k] for k in EncoderSettings.__dataclass_fields__ if k in saved}
                info = {k: v for k, v in saved.items() if k not in stored and k not in ("format", "fingerprint")}
            else:
                stored = read_sentence_transformers_settings(Path(path))
        overrides = dict(pooling=pooling, normalize=normalize, max_length=max_length,
                         query_prefix=query_prefix, document_prefix=document_prefix)
        stored.update({k: v for k, v in overrides.items() if v is not None})
        settings = EncoderSettings(**stored)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            if dropout is not None:
                for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
                    if hasattr(config, attr):
                        setattr(config, attr, dropout)
            encoder = AutoModel.from_pretrained(
                path, config=config, use_safetensors=not allow_pickle or None,
                trust_remote_code=trust_remote_code, dtype=torch.float32,
            )
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if Path(path).is_dir():
                raise ModelLoadError(f"cannot load model from {path}: {e}") from e
            raise ModelLoadError(f"cannot resolve model {name_or_path!r}; tried {describe_attempts(name_or_path)}: {e}") from e
        return cls(encoder, tokenizer, settings, info)

    # --- properties -----------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.settings.max_length

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self, compute: str = "float32") -> str:
        """Stable hash of the weights and every setting that changes an embedding (`compute`: see `encode`)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.encoder.state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        s = self.settings
        keyed = dict(pooling=s.pooling, normalize=s.normalize, max_length=s.max_length,
                     query_prefix=s.query_prefix, document_prefix=s.document_prefix)
        if compute != "float32":
            keyed["compute"] = compute
        h.update(json.dumps(keyed, sort_keys=True).encode())
        return h.hexdigest()[:16]

    # --- the forward path -----------------------------------------------------------------------------
    def with_prefix(self, texts: list[str], kind: str) -> list[str]:
        """`texts` with the query or document prefix stored with the model."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        prefix = self.settings.query_prefix if kind == "query" else self.settings.document_prefix
        return [prefix + t for t in texts] if prefix else list(texts)

    def tokenize(self, texts: list[str], kind: str = "document") -> dict[str, torch.Tensor]:
        """Tokenize with the kind's prefix, padding to the longest text and truncating at `max_length`."""
        return dict(self.tokenizer(self.with_prefix(texts, kind), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt"))

    def token_lengths(self, texts: list[str], kind: str = "document") -> list[int]:
        """Tokens in each text with the kind's prefix and special tokens, before truncation."""
        ids = self.tokenizer(self.with_prefix(texts, kind), truncation=False, verbose=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return [len(x) for x in ids]

    def length_order(self, texts: list[str], kind: str = "document") -> list[int]:
        """Indices of `texts`, longest first in tokens (as truncated at `max_length`); ties keep input order."""
        lengths = [min(n, self.max_length) for n in self.token_lengths(texts, kind)]
        return sorted(range(len(texts)), key=lambda i: -lengths[i])

    def count_truncated(self, texts: list[str], kind: str = "document") -> int:
        """How many of `texts` (with the kind's prefix) are longer than `max_length` tokens."""
        return sum(n > self.max_length for n in self.token_lengths(texts, kind))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> pooled (and normalised) embeddings [batch, dim]."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        emb = pool(hidden, attention_mask, self.settings.pooling)
        return F.normalize(emb, dim=-1) if self.settings.normalize else emb

    def embed(self, texts: list[str], kind: str = "document") -> torch.Tensor:
        """Tokenize and forward one batch on the model's device (with gradients if enabled)."""
        features = {k: v.to(self.device) for k, v in self.tokenize(texts, kind).items()}
        return self(**features)

    # --- inference ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        *,
        kind: str = "document",
        dim: int | None = None,
        precision: str = "float32",
        calibration: Int8Calibration | None = None,
        show_progress_bar: bool = False,
        convert_to_tensor: bool = False,
        compute: str = "float32",
    ):
        """Embed `texts` in input order (batched by token length to cut padding).

        `dim` keeps a Matryoshka prefix and re-normalises it. `precision` of the output: "float32"; "int8"
        (per-dimension ranges from `calibration`, or calibrated on these embeddings); "binary" (sign bits
        packed in uint8). `compute`: "float32", or "int8" to run the linear layers in int8 on the CPU
        (`models.quantize.int8_linear_copy`, built once per version of the weights).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
        runner = self._int8_runner() if compute == "int8" else self
        was_training = self.training
        self.eval()
        order = self.length_order(texts, kind)
        chunks = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not show_progress_bar):
            batch = [texts[i] for i in order[start:start + batch_size]]
            chunks.append(runner.embed(batch, kind).float().cpu())
        self.train(was_training)
        emb = torch.empty(len(texts), self.dim)
        if chunks:
            emb[torch.as_tensor(order)] = torch.cat(chunks)
        emb = truncate(emb, dim, self.settings.normalize)
        if precision == "float32":
            return emb if convert_to_tensor else emb.numpy()
        array = emb.numpy()
        if precision == "int8":
            out = quantize_int8(array, calibration or calibrate_int8(array))
        else:
            out = quantize_binary(array)
        return torch.from_numpy(out) if convert_to_tensor else out

    def _int8_runner(self) -> "BiEncoder":
        """This model with int8 linear layers, rebuilt when any weight has changed since the last call."""
        version = tuple(p._version for p in self.encoder.parameters())
        cached = self.__dict__.get("_int8")  # a plain attribute, not a registered submodule
        if cached is None or cached[0] != version:
            runner = BiEncoder(int8_linear_copy(self.encoder), self.tokenizer, self.settings)
            self.__dict__["_int8"] = cached = (version, runner)
        return cached[1]

    # --- export ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, info: dict | None = None, overwrite: bool = False) -> Path:
        """Write the model atomically in twinfold and sentence-transformers layouts (see models.export).

        `directory` may be missing, empty or a folder twinfold wrote; anything else is refused
        (`models.atomic.OverwriteRefused`) unless `overwrite`.
        """
        from models.export import write_model_folder

        if info:
            self.info.update(info)
        with atomic_directory(directory, overwrite) as tmp:
            write_model_folder(self, tmp)
        return Path(directory)

    def settings_dict(self) -> dict:
        return asdict(self.settings)


def truncate(emb: torch.Tensor, dim: int | None, normalize: bool = True) -> torch.Tensor:
    """Keep the first `dim` dimensions (a Matryoshka prefix), re-normalised when `normalize`."""
    if dim is None or dim == emb.shape[-1]:
        return emb
    if not 0 < dim <= emb.shape[-1]:
        raise ValueError(f"dim must be in 1..{emb.shape[-1]}, got {dim}")
    emb = emb[..., :dim]
    return F.normalize(emb, dim=-1) if normalize else emb
