"""The Siamese bi-encoder: one shared Hugging Face encoder, pooling, L2 normalisation."""
import hashlib
import json
import logging
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from twinfold.losses.matryoshka import truncate
from twinfold.models.families import (
    DROPOUT_KEYS,
    checkpoint_dtype,
    encoder_class,
    resolve_attn_implementation,
    torch_dtype,
)
from twinfold.models.files.atomic import atomic_directory
from twinfold.models.head import load_dense
from twinfold.models.loading import (
    SIMILARITIES,
    ModelLoadError,
    check_model_folder,
    has_tokenizer,
    read_sentence_transformers_layout,
    refused_pickle,
)
from twinfold.models.lora import (
    UNUSED_PREFIXES,
    adapter_base,
    check_adapter_folder,
    has_lora,
    is_adapter_folder,
    load_lora,
    merged_encoder,
)
from twinfold.models.onnx import ONNX_DIR, onnx_encoder
from twinfold.models.pooling import POOLING_MODES, pool
from twinfold.models.quantize import (
    COMPUTES,
    PRECISIONS,
    Int8Calibration,
    calibrate_int8,
    float32_module,
    int8_linear_copy,
    quantize_binary,
    quantize_int8,
)
from twinfold.models.resolve import describe_attempts, resolve_model_path
from twinfold.models.runtime import attention_kernels, loader_settings, pad_multiple
from twinfold.models.tokens import Padder, TextTokenizer, ends_with_eos
from twinfold.models.unpad import check_setting, enable_unpadded, first_position, packs, unpack, varlen_kwargs

log = logging.getLogger(__name__)
TWINFOLD_FILE = "twinfold.json"
KINDS = ("query", "document")
DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # the names sentence-transformers' encode_document tries


@dataclass
class EncoderSettings:
    """Everything besides the weights that decides an embedding; stored in `twinfold.json`."""

    pooling: str = "mean"
    normalize: bool = True
    similarity: str = "cosine"  # what the loss trains and search ranks by: cosine, or dot (inner product)
    max_length: int | None = None
    # named prompts (sentence-transformers' `prompts` and `default_prompt_name`): query and document prefixes
    # are picked from them as sentence-transformers' encode_query / encode_document pick them
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    matryoshka_dims: list[int] = field(default_factory=list)
    append_eos: bool = False  # end every text with the EOS token (last-token pooling of a tokenizer that does not)

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {self.pooling!r} is not one of {', '.join(POOLING_MODES)}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity {self.similarity!r} is not one of {', '.join(SIMILARITIES)}")
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the prompts "
                             f"({', '.join(self.prompts) or 'none'})")

    @property
    def query_prefix(self) -> str:
        """The prompt queries take: `prompts["query"]`, else the default prompt, else none."""
        return self.prompts.get("query", self.prompts.get(self.default_prompt_name, ""))

    @query_prefix.setter
    def query_prefix(self, text: str) -> None:
        if text != self.query_prefix:
            self.prompts["query"] = text

    @property
    def document_prefix(self) -> str:
        """The prompt documents take: `prompts` "document", "passage" or "corpus", else the default prompt."""
        name = next((n for n in DOCUMENT_PROMPTS if n in self.prompts), self.default_prompt_name)
        return self.prompts.get(name, "")

    @document_prefix.setter
    def document_prefix(self, text: str) -> None:
        if text != self.document_prefix:
            self.prompts[next((n for n in DOCUMENT_PROMPTS if n in self.prompts), "document")] = text

    def prompt(self, name: str) -> str:
        """The named prompt's text; a ValueError names the prompts there are."""
        if name not in self.prompts:
            raise ValueError(f"prompt {name!r} is not one of the model's prompts "
                             f"({', '.join(map(repr, self.prompts)) or 'it has none'})")
        return self.prompts[name]


class BiEncoder(nn.Module):
    """A shared encoder for queries and documents: tokens -> pooled vector -> Dense head (optional) ->
    (optionally) unit length.

    `max_length` lives here and only here: `tokenize`, `encode` and training all read it. `unpad` (auto, True,
    False; see `models.unpad`): whether chunks of texts run packed into one row without padding.
    """

    def __init__(self, encoder: nn.Module, tokenizer, settings: EncoderSettings | None = None, info: dict | None = None,
                 head: nn.Sequential | None = None, checkpoint_dtype: str | None = None, unpad: bool | str = False):
        super().__init__()
        self.encoder = encoder
        self.unpad = enable_unpadded(encoder, unpad)
        # the dtype of the weights loaded (`models.families.DTYPES`): a training run exports in it
        self.checkpoint_dtype = checkpoint_dtype or str(encoder.dtype).removeprefix("torch.")
        self.head = head if head is not None else nn.Sequential()  # Dense layers after pooling (models.head)
        self.tokenizer = tokenizer
        self.settings = settings or EncoderSettings()
        if self.settings.max_length is None:
            limits = [tokenizer.model_max_length, getattr(encoder.config, "max_position_embeddings", None)]
            self.settings.max_length = min(int(x) for x in limits if x is not None and x < 1e9)
        self.info = dict(info or {})
        freeze_unused(encoder)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        similarity: str | None = None,
        max_length: int | None = None,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        append_eos: bool | None = None,
        dropout: float | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        unpad: bool | str = False,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> "BiEncoder":
        """Load a twinfold, sentence-transformers or plain Hugging Face folder (or hub id).

        Explicit arguments override what the folder stores. `dtype` (`models.families.DTYPES`): the weights' dtype,
        auto keeping the checkpoint's, as sentence-transformers does. `attn_implementation`: sdpa, flash_attention_2
        or eager (sdpa runs eager on a model without an SDPA kernel). `unpad`: run texts packed without padding
        (`models.unpad`; auto: on CUDA). T5-like checkpoints load their encoder alone.
        Weights load from safetensors only unless `allow_pickle`; custom model code runs only with
        `trust_remote_code`.
        """
        from transformers import AutoConfig, AutoTokenizer

        check_setting(unpad)
        path = resolve_model_path(name_or_path)
        adapter = Path(path) if is_adapter_folder(path) else None  # a LoRA adapter: the base's weights + its own
        if adapter is not None:
            check_adapter_folder(adapter, allow_pickle=allow_pickle)
            path = resolve_model_path(adapter_base(adapter))
        # settings, head and tokenizer: the adapter folder's where it has them, else the base's
        described = adapter if adapter is not None and (adapter / "modules.json").exists() else Path(path)
        stored: dict = {}
        info: dict = {}
        dense_folders: list[Path] = []
        if described.is_dir():
            stored, dense_folders = read_sentence_transformers_layout(described)  # first: names unsupported layouts
            twinfold_file = described / TWINFOLD_FILE
            if twinfold_file.exists():
                saved = json.loads(twinfold_file.read_text())
                if "prompts" not in saved:  # written before named prompts: a query and a document prefix
                    prefixes = {kind: saved.pop(f"{kind}_prefix", "") for kind in KINDS}
                    saved["prompts"] = {kind: text for kind, text in prefixes.items() if text}
                stored = {k: saved[k] for k in EncoderSettings.__dataclass_fields__ if k in saved}
                info = {k: v for k, v in saved.items() if k not in stored and k not in ("format", "fingerprint")}
        if Path(path).is_dir():
            check_model_folder(Path(path), allow_pickle=allow_pickle)
        tokenizer_path = adapter if adapter is not None and has_tokenizer(adapter) else path
        overrides = dict(pooling=pooling, normalize=normalize, similarity=similarity, max_length=max_length,
                         append_eos=append_eos)
        stored.update({k: v for k, v in overrides.items() if v is not None})
        settings = EncoderSettings(**stored)
        if query_prefix is not None:
            settings.query_prefix = query_prefix
        if document_prefix is not None:
            settings.document_prefix = document_prefix
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            stored_dtype = checkpoint_dtype(config)
            if dropout is not None:
                for attr in DROPOUT_KEYS:
                    if hasattr(config, attr):
                        setattr(config, attr, dropout)
            if hasattr(config, "use_cache"):  # a decoder's key/value cache is of no use to embedding
                config.use_cache = False
            model_class = encoder_class(config)
            encoder = model_class.from_pretrained(
                path, config=config, use_safetensors=not allow_pickle or None,
                trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype, config),
                attn_implementation=resolve_attn_implementation(attn_implementation, model_class, config),
            )
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
            if adapter is not None:
                encoder = load_lora(encoder, adapter)
        except pickle.UnpicklingError as e:  # torch's weights-only loader met something other than tensors
            raise refused_pickle(path, e) from e
        except (OSError, ValueError) as e:
            if Path(path).is_dir():
                raise ModelLoadError(f"cannot load model from {path}: {e}") from e
            raise ModelLoadError(f"cannot resolve model {name_or_path!r}; tried {describe_attempts(name_or_path)}: "
                                 f"{e}") from e
        head = nn.Sequential(*(load_dense(folder, allow_pickle) for folder in dense_folders))
        if len(head) and head[0].in_features != encoder.config.hidden_size:
            raise ModelLoadError(f"{dense_folders[0]}: in_features {head[0].in_features} does not match the "
                                 f"encoder's hidden size {encoder.config.hidden_size}")
        for before, after, folder in zip(head, head[1:], dense_folders[1:]):
            if after.in_features != before.out_features:
                raise ModelLoadError(f"{folder}: in_features {after.in_features} does not match the previous "
                                     f"Dense layer's out_features {before.out_features}")
        check_eos(tokenizer, settings, path)
        # the head computes in the encoder's dtype, as sentence-transformers' does
        model = cls(encoder, tokenizer, settings, info, head.to(encoder.dtype), stored_dtype, unpad)
        # ONNX compute runs the folder's files while the weights are those (not the base's files under an adapter)
        if adapter is None and (Path(path) / ONNX_DIR).is_dir():
            model.__dict__["_source"] = (Path(path), model._weights_digest())
        return model

    # --- properties -----------------------------------------------------------------------------------
    @property
    def _no_split_modules(self) -> list[str]:
        """The encoder's layer classes: what FSDP wraps as units (accelerate reads this name)."""
        return list(getattr(self.encoder, "_no_split_modules", None) or [])

    @property
    def max_length(self) -> int:
        return self.settings.max_length

    @property
    def dim(self) -> int:
        return self.head[-1].out_features if len(self.head) else int(self.encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self, compute: str = "float32") -> str:
        """Stable hash of the weights and every setting that changes an embedding (`compute`: see `encode`)."""
        h = hashlib.sha256()
        head = {f"head.{name}": t for name, t in self.head.state_dict().items()}  # none: hashes stay as before
        hash_tensors(h, {**self.encoder.state_dict(), **head})
        s = self.settings
        keyed = dict(pooling=s.pooling, normalize=s.normalize, max_length=s.max_length,
                     query_prefix=s.query_prefix, document_prefix=s.document_prefix)
        if s.append_eos:
            keyed["append_eos"] = True
        if compute != "float32":
            keyed["compute"] = compute
        h.update(json.dumps(keyed, sort_keys=True).encode())
        return h.hexdigest()[:16]

    # --- the forward path -----------------------------------------------------------------------------
    def tokenize(self, texts: list[str], kind: str = "document") -> dict[str, torch.Tensor]:
        """Tokenize with the kind's prefix, padding to the longest text and truncating at `max_length`."""
        return self.padder(self.token_ids(texts, kind))

    def token_ids(self, texts: list[str], kind: str = "document") -> list[list[int]]:
        """Token ids of each text with the kind's prefix and special tokens, truncated at `max_length`, unpadded."""
        return self.text_tokenizer.ids(texts, check_kind(kind))

    def prompt_text(self, prompt_name: str | None = None, prompt: str | None = None) -> str | None:
        """The text that `prompt_name` (one of `settings.prompts`) or `prompt` (a literal text) stands for; None for
        neither."""
        if prompt_name is not None and prompt is not None:
            raise ValueError(f"give a prompt name or a prompt text, not both (prompt_name {prompt_name!r}, "
                             f"prompt {prompt!r})")
        return self.settings.prompt(prompt_name) if prompt_name is not None else prompt

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """Tokenization with this model's prefixes and `max_length` (picklable, for worker processes)."""
        s = self.settings
        return TextTokenizer(self.tokenizer, s.max_length, s.query_prefix, s.document_prefix, s.append_eos)

    @property
    def padder(self) -> Padder:
        """Pads token ids into encoder inputs for this model's device, or packs them where it runs unpadded
        (picklable, for DataLoader workers)."""
        packed = packs(self.unpad, self.device)
        return Padder.for_tokenizer(self.tokenizer, pad_multiple(self.device), self.settings.max_length, packed,
                                    first_position(self.encoder.config) if packed else 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids -> pooled (and normalised) embeddings [batch, dim] (training goes through here)."""
        return self.embed_tokens(input_ids, attention_mask, token_type_ids, position_ids, cu_seq_lens)

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        """The computation of `forward`, on padded inputs or packed ones (`Padder.pack`: `cu_seq_lens` given, a
        row of texts without padding, `attention_mask` per text). `encode` calls it directly, so a mixed-precision
        wrapper that an Accelerator puts around `forward` for training never changes what `encode` computes."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if cu_seq_lens is not None:  # attention within each text; positions restart per text
            kwargs.update(position_ids=position_ids, **varlen_kwargs(cu_seq_lens, attention_mask.shape[1]))
        with attention_kernels(input_ids.device):  # the backward runs the kernels the forward chose
            mask = None if cu_seq_lens is not None else attention_mask
            hidden = self.encoder(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
        if cu_seq_lens is not None:
            hidden = unpack(hidden, cu_seq_lens, attention_mask.shape[1])  # [texts, longest, dim]
        emb = self.head(pool(hidden, attention_mask, self.settings.pooling))
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
        prompt_name: str | None = None,
        prompt: str | None = None,
        dim: int | None = None,
        precision: str = "float32",
        calibration: Int8Calibration | None = None,
        show_progress_bar: bool = False,
        convert_to_tensor: bool = False,
        compute: str = "float32",
    ):
        """Embed `texts` in input order, with the `kind`'s prefix; `prompt_name` (one of `settings.prompts`) or
        `prompt` (a literal text) replaces it, as in sentence-transformers' `encode(prompt_name=...)`.

        Texts are sorted by length in characters (no tokenization pass just to sort) and batched; batches are
        tokenized in background workers on a GPU and stay on the device until the end. `dim` keeps a Matryoshka
        prefix and re-normalises it. `precision` of the output: "float32"; "int8" (per-dimension ranges from
        `calibration`, or calibrated on these embeddings); "binary" (sign bits packed in uint8). `compute`:
        "float32"; "bf16" (autocast; fast on GPUs and on CPUs with bf16 units, see
        `models.runtime.cpu_has_bf16`); "int8" (linear layers in int8 on the CPU,
        `models.quantize.int8_linear_copy`); "onnx" or "onnx-int8" (the encoder in ONNX Runtime on the CPU,
        float32 or int8: the model folder's `onnx/` file while the weights are those loaded from it, else an
        export of the current weights, see `models.onnx`). Other computes than float32 and bf16 are built once
        per version of the weights.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
        runner = self._compute_runner(compute)
        device = self.device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute == "bf16")
        tokenizer = self.text_tokenizer.with_prompt(check_kind(kind), self.prompt_text(prompt_name, prompt))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        padder = self.padder if runner is self else self.padder.padded()  # other computes take padded inputs
        batches = TextBatches([texts[i] for i in order], kind, batch_size, tokenizer, padder)
        settings = loader_settings(device)
        loader = DataLoader(batches, batch_size=None, generator=torch.Generator(), **settings)  # global RNG untouched
        in_order = torch.empty(len(texts), self.dim, pin_memory=settings["pin_memory"])
        was_training = self.training
        self.eval()
        start = 0
        for features in tqdm(loader, desc="encode", disable=not show_progress_bar):
            with autocast:
                out = runner.embed_tokens(**{k: v.to(device, non_blocking=True) for k, v in features.items()})
            in_order[start:start + len(out)].copy_(out.float(), non_blocking=True)
            start += len(out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.train(was_training)
        emb = torch.empty_like(in_order, pin_memory=False)
        emb[torch.as_tensor(order, dtype=torch.long)] = in_order
        emb = truncate(emb, dim, self.settings.normalize)
        if precision == "float32":
            return emb if convert_to_tensor else emb.numpy()
        array = emb.numpy()
        if precision == "int8":
            out = quantize_int8(array, calibration or calibrate_int8(array))
        else:
            out = quantize_binary(array)
        return torch.from_numpy(out) if convert_to_tensor else out

    def _weights_digest(self) -> str:
        """SHA-256 of the encoder's weights as they are now. Tensor version counters would be cheaper, but a
        fused optimizer step (the trainer's AdamW) changes weights without bumping them."""
        h = hashlib.sha256()
        hash_tensors(h, self.encoder.state_dict())
        return h.hexdigest()

    def _compute_runner(self, compute: str) -> "BiEncoder":
        """This model with its encoder computed as `compute` asks (itself for float32 and bf16), sharing the
        tokenizer, settings and head; rebuilt when the weights have changed since the last call (checked by
        hashing them: about 0.1 s per call for all-MiniLM-L6-v2 on a CPU)."""
        if compute in ("float32", "bf16"):
            return self
        if self.device.type != "cpu":
            raise ValueError(f"compute={compute!r} runs on the CPU; this model is on {self.device}")
        digest = self._weights_digest()
        runners = self.__dict__.setdefault("_runners", {})  # plain attributes, not registered submodules
        if compute not in runners or runners[compute][0] != digest:
            plain = self.merged()
            if compute == "int8":
                encoder = int8_linear_copy(plain.encoder)
            else:
                source, loaded = self.__dict__.get("_source", (None, None))
                encoder = onnx_encoder(plain, compute, source if loaded == digest else None)
            head = float32_module(plain.head)  # these computes give float32 token states
            runners[compute] = (digest, BiEncoder(encoder, self.tokenizer, self.settings, head=head,
                                                  checkpoint_dtype=self.checkpoint_dtype))
        return runners[compute][1]

    def merged(self) -> "BiEncoder":
        """This model with its LoRA adapter added into a copy of the weights (itself when it has none)."""
        if not has_lora(self.encoder):
            return self
        return BiEncoder(merged_encoder(self.encoder), self.tokenizer, self.settings, self.info, self.head,
                         self.checkpoint_dtype, self.unpad)

    # --- export ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, info: dict | None = None, overwrite: bool = False,
                        onnx: bool = False, onnx_int8: bool = False, adapter: bool = False) -> Path:
        """Write the model atomically in twinfold and sentence-transformers layouts (see models.export).

        `directory` may be missing, empty or a folder twinfold wrote; anything else is refused
        (`models.atomic.OverwriteRefused`) unless `overwrite`; a training checkpoint always is. `onnx` adds
        `onnx/model.onnx`, `onnx_int8` also its int8 copy (see models.onnx). A LoRA model is written merged into
        ordinary weights, or with `adapter` as its adapter alone (see models.lora).
        """
        from twinfold.models.export import check_not_a_checkpoint, write_model_folder

        check_not_a_checkpoint(directory)
        if info:
            self.info.update(info)
        with atomic_directory(directory, overwrite) as tmp:
            write_model_folder(self, tmp, onnx=onnx, onnx_int8=onnx_int8, adapter=adapter)
        return Path(directory)

    def settings_dict(self) -> dict:
        return asdict(self.settings)


def check_eos(tokenizer, settings: EncoderSettings, path) -> None:
    """`append_eos` needs an EOS token; last-token pooling without it, of a tokenizer that does not end a text with
    its EOS token, pools the last word instead: logged as a warning naming the fix."""
    eos = tokenizer.eos_token_id
    if settings.append_eos and eos is None:
        raise ModelLoadError(f"{path}: append_eos is set but the tokenizer has no EOS token (eos_token)")
    if settings.pooling == "lasttoken" and not settings.append_eos and eos is not None and not ends_with_eos(tokenizer):
        log.warning("%s: last-token pooling, but the tokenizer does not end a text with its EOS token %r; set "
                    "model.append_eos: true (BiEncoder.from_pretrained(..., append_eos=True)) to append it",
                    path, tokenizer.eos_token)


def freeze_unused(encoder: nn.Module) -> None:
    """Freeze the parameters the pooled embedding never uses (BERT's pooler head): they get no gradient, and
    DDP would wait for one."""
    for name, param in encoder.named_parameters():
        if name.startswith(UNUSED_PREFIXES):
            param.requires_grad_(False)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def hash_tensors(h, tensors: dict[str, torch.Tensor]) -> None:
    """Feed each tensor's name, dtype, shape and bytes to the hash `h`, in name order."""
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())


class TextBatches(Dataset):
    """Batch i of texts (already in the wanted order), tokenized and padded: what `encode`'s loader workers run."""

    def __init__(self, texts: list[str], kind: str, batch_size: int, tokenizer: TextTokenizer, padder: Padder):
        self.texts, self.kind, self.batch_size, self.tokenizer, self.padder = texts, kind, batch_size, tokenizer, padder

    def __len__(self) -> int:
        return -(-len(self.texts) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.padder(self.tokenizer.ids(self.texts[i * self.batch_size:(i + 1) * self.batch_size], self.kind))
