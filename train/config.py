"""Run configuration: YAML recipe + `section.key=value` overrides -> validated, typed config.

Environment variables expand in strings (`${TWINFOLD_DATA}`, `${VAR:-default}`); unknown keys are errors
with a "did you mean"; the resolved config is saved in the run folder.
"""
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from twinfold.losses import (
    DEFAULT_TEMPERATURE,
    DISTILLATION_KINDS,
    ESTIMATORS,
    MIN_TEMPERATURE,
    ROLES,
    SIMILARITIES,
    check_dims,
)
from twinfold.models.families import ATTN_IMPLEMENTATIONS, DTYPES, check_attn_implementation
from twinfold.models.loading import ModelLoadError
from twinfold.models.lora import LoraSettings
from twinfold.models.pooling import POOLING_MODES
from twinfold.models.quantize import COMPUTES, PRECISIONS
from twinfold.models.search import RESCORE_MULTIPLIER
from twinfold.models.unpad import SETTINGS as UNPAD_SETTINGS
from twinfold.train.eval.bm25 import settings_from
from twinfold.train.eval.metrics import DEFAULT_K_VALUES, METRICS, metric_names

MAX_WEIGHT = 100  # a dataset's rows repeated per epoch: beyond this, an epoch's plan alone outgrows memory


class ConfigError(ValueError):
    """A config that cannot run, with the key at fault."""


@dataclass
class ModelConfig:
    name_or_path: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: str | None = None  # null keeps the checkpoint's (mean for plain HF models)
    max_length: int | None = None  # the one place that sets it; null keeps the checkpoint's
    dropout: float | None = None  # null keeps the checkpoint's
    normalize: bool | None = None
    similarity: str | None = None  # cosine | dot: what the loss trains and search ranks by; null keeps the checkpoint's
    query_prefix: str | None = None
    document_prefix: str | None = None
    append_eos: bool | None = None  # end every text with EOS (last-token pooling); null keeps the checkpoint's
    allow_pickle: bool = False
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # auto: float32 master weights for training (under train.mixed_precision), the checkpoint's dtype for the export;
    # bfloat16: the weights and AdamW's moments in bf16 (less memory, less exact); see docs/models.md
    dtype: str = "auto"
    attn_implementation: str = "sdpa"  # sdpa | flash_attention_2 (needs flash-attn) | eager
    # auto: texts packed without padding on CUDA (varlen attention, models.unpad); true: also on the CPU; false: padded
    unpad: bool | str = False
    lora: LoraSettings | None = None  # set (e.g. {r: 16}): train a LoRA adapter only (models.lora)


@dataclass
class HardNegativesConfig:
    """Mining of hard negatives with the base model before training (see train.mine)."""

    num_negatives: int = 1  # per row; rows with fewer eligible candidates are dropped
    range_min: int = 0  # skip the candidates ranked above this (0-based, relevant documents not counted)
    range_max: int = 50  # draw from candidates ranked below this
    max_score_ratio: float | None = 0.95  # false-negative guard: drop candidates scoring above this x the positive's
    candidates: str = "dense"  # dense (the model's cosine) | bm25 (bm25s ranks; the guard still uses the model)
    sampling: str = "top"  # top (the highest eligible) | random (uniform among the eligible, seeded)
    corpus: str | None = None  # BEIR folder or JSONL (_id, title, text); null: the positives of the data
    seed: int = 42
    cache_dir: str | None = None  # null: OUTPUT/mined
    # a second false-negative guard: a cross-encoder or bi-encoder (as `twinfold score --teacher`) drops candidates
    # it scores above the row's positive's score minus teacher_margin
    teacher: str | None = None
    teacher_margin: float = 0.0


@dataclass
class DatasetConfig:
    path: str = ""  # local .jsonl/.json/.csv/.parquet file or hub id
    columns: dict[str, str] = field(default_factory=dict)  # source column -> anchor | positive | negative
    split: str = "train"
    weight: float = 1.0  # batches of this dataset per epoch = weight x its full batches
    name: str | None = None
    hard_negatives: HardNegativesConfig | None = None  # set: mine negatives before training
    streaming: bool = False  # read the rows as they come (train.streams): data bigger than the disk cache
    # the anchors' prompt in place of the model's query prefix (a task instruction per dataset): the name of one of
    # the model's prompts, or a text
    query_prompt_name: str | None = None
    query_prompt: str | None = None


@dataclass
class DataConfig:
    train: list[DatasetConfig] = field(default_factory=list)
    mixing: str = "proportional"  # proportional | round_robin
    cache_dir: str | None = None  # tokenized datasets; null: $TWINFOLD_CACHE or ~/.cache/twinfold
    dedup: bool = False  # drop duplicate and near-duplicate (cosine >= 0.95) training pairs, keeping the first
    drop_eval_overlap: bool = False  # drop pairs whose anchor or positive (nearly) equals an eval query or judged doc
    near_check_rows: int | None = 50_000  # near (cosine) checks encode every text: only datasets up to this size
    shuffle_buffer: int = 10_000  # streaming runs: rows of each dataset and process shuffled and packed together


@dataclass
class QuantizationConfig:
    """Loss terms that train the embeddings for the precisions they are searched in (losses.quantization)."""

    binary: float = 0.0  # weight of the term on the documents' sign bits
    int8: float = 0.0  # weight of the term on the documents' int8 codes
    alignment: float = 0.0  # weight of 1 - cos(e, sign bits of e), mean over every embedding (queries too)
    dims: list[int] | None = None  # null: every Matryoshka dim (the full dim without Matryoshka)
    estimator: str = "ste"  # ste (exact codes forward, gradient straight through) | tanh (smooth sign bits)
    rotation_steps: int = 0  # > 0: after training, fit the code rotation (train.rotation), this many steps a block


@dataclass
class LossConfig:
    # infonce (in-batch and hard negatives) | margin_mse | kl: distillation from the teacher scores of the data's
    # score_positive and score_negative_1..k columns (`twinfold score`), over each row's positive and negatives
    kind: str = "infonce"
    temperature: float = DEFAULT_TEMPERATURE
    teacher_temperature: float | None = None  # margin_mse, kl: divides the teacher's scores; null: loss.temperature
    learnable_temperature: bool = False
    temperature_lr: float = 1e-2  # the learnable temperature's own peak learning rate (on log temperature)
    symmetric: bool = False
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] | None = None
    mini_batch_size: int | None = None  # set: cached (GradCache) mode, memory grows with this, not the batch
    mask_false_negatives: bool = True
    check_replay: bool = False  # cached mode: fail if a re-encoded chunk differs from its cached embeddings
    quantization: QuantizationConfig | None = None  # set (e.g. {binary: 1.0}): train for binary / int8 search


@dataclass
class TrainConfig:
    batch_size: int = 32  # global batch: the pool of in-batch negatives, whatever the number of processes
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    scheduler: str = "linear"  # linear | cosine
    grad_accum: int = 1  # averages gradients of several batches; adds no negatives
    max_grad_norm: float | None = 1.0
    seed: int = 42
    output_dir: str = "runs/default"
    save_steps: int | None = None
    save_total_limit: int = 2
    eval_steps: int | None = None
    log_steps: int = 10  # losses reach the host (and metrics.jsonl) every this many steps: no per-step device sync
    chunk_tokens: int | None = None  # padded tokens per forward; null: the device's default (GPU 65536, CPU 2048)
    resume: bool = False
    mixed_precision: str | None = None  # no | bf16 | fp16; null follows the launcher (accelerate launch)


@dataclass
class EvalConfig:
    data: str | None = None  # BEIR folder
    split: str = "test"
    dims: list[int] | None = None  # default: loss.matryoshka_dims, else the model's dim
    precisions: list[str] = field(default_factory=lambda: ["float32"])
    bm25: bool = False
    bm25_preset: str = "bm25s"  # bm25s (k1 1.5, b 0.75) | anserini (k1 0.9, b 0.4, Anserini's BEIR settings)
    bm25_k1: float | None = None  # overrides the preset
    bm25_b: float | None = None
    bm25_stemmer: str | None = None  # e.g. english (Snowball, needs PyStemmer)
    bm25_split_identifiers: bool = False  # code-like text: camelCase / snake_case / dotted names add their parts
    sts: str | None = None
    # general sets scored for the base and the final model, to measure forgetting: STS files (Spearman) or BEIR
    # folders (nDCG@10 on general_split); a warning when a score falls more than general_tolerance
    general: list[str] = field(default_factory=list)
    general_split: str = "test"
    general_tolerance: float = 0.01
    batch_size: int = 64
    ignore_identical_ids: bool = False
    rescore_multiplier: int = RESCORE_MULTIPLIER  # binary: Hamming candidates per result, rescored by the float query
    metric: str = "ndcg@10"  # decides the best checkpoint
    compute: str = "float32"  # models.quantize.COMPUTES: how evaluation encodes
    query_prompt_name: str | None = None  # the queries' prompt in place of the model's query prefix: a prompt name...
    query_prompt: str | None = None  # ...or a text


@dataclass
class LogConfig:
    wandb: bool = False
    wandb_project: str = "twinfold"
    wandb_mode: str | None = None  # online | offline (null: wandb's default / WANDB_MODE)
    run_name: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {"data.mixing": ("proportional", "round_robin"), "train.scheduler": ("linear", "cosine"),
            "train.mixed_precision": (None, "no", "bf16", "fp16"), "model.pooling": (None, *POOLING_MODES),
            "model.similarity": (None, *SIMILARITIES), "eval.compute": COMPUTES, "model.dtype": DTYPES,
            "model.attn_implementation": ATTN_IMPLEMENTATIONS,
            "model.unpad": UNPAD_SETTINGS,
            "log.wandb_mode": (None, "online", "offline", "disabled"), "eval.bm25_preset": ("bm25s", "anserini"),
            "loss.kind": ("infonce", *DISTILLATION_KINDS)}


class _RecipeLoader(yaml.SafeLoader):
    """YAML as a recipe needs it: a key given twice or an alias (`*name`: unbounded expansion) is an error, and a
    number keeps the text it was written as, for keys that are strings (`query_prefix: 0123` stays "0123")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _YamlRefused(event.start_mark, f"alias *{event.anchor}: aliases are not allowed in a recipe; "
                                                 "write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _YamlRefused(key_node.start_mark, f"key {key!r} appears twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep)


class _YamlRefused(Exception):
    def __init__(self, mark, message: str):
        super().__init__(f"line {mark.line + 1}: {message}")


class _Int(int):
    """An int read from YAML with its text."""


class _Float(float):
    """A float read from YAML with its text."""


def _number_with_text(number_type, construct):
    def constructor(loader, node):
        value = number_type(construct(loader, node))
        value.text = node.value
        return value
    return constructor


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _number_with_text(_Int, yaml.SafeLoader.construct_yaml_int))
_RecipeLoader.add_constructor("tag:yaml.org,2002:float",
                              _number_with_text(_Float, yaml.SafeLoader.construct_yaml_float))


def read_yaml(text: str):
    """YAML text read by the recipe rules (`_RecipeLoader`); raises `_YamlRefused` or `yaml.YAMLError`."""
    return yaml.load(text, _RecipeLoader)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe, apply `section.key=value` overrides, expand env vars, validate."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give the recipe's YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except _YamlRefused as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: write it as section.key=value, e.g. train.lr=3e-5")
        *path, name = key.split(".")
        target = raw
        for i, part in enumerate(path):  # model.lora.r=8 creates model.lora where it is missing or null
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])!r} is not a mapping")
            target = target[part]
        target[name] = _parse_override(value, _field_type(key), key)
    config = _build(Config, _expand_env(raw, ""), "")
    validate(config)
    return config


def _field_type(key: str):
    """The declared type of the dotted `key`, or None for keys the schema lacks (`_build` names them)."""
    hint = Config
    for part in key.split("."):
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # an optional section: its dataclass
            hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def _parse_override(text: str, hint, key: str):
    """An override's text read as its key's type: strings as written, true/false, numbers, `null`, YAML lists."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if text == "null":
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is str:
        return text
    if not text:
        return None  # `key=` clears an optional key, as `null` does
    if hint is bool:
        if text.lower() not in ("true", "false"):
            raise ConfigError(f"{key}: expected bool (true or false), got {text!r}")
        return text.lower() == "true"
    if hint in (int, float):
        return text  # `_coerce` parses numbers from text and names the key if it cannot
    try:
        return read_yaml(text)
    except (yaml.YAMLError, _YamlRefused) as e:
        raise ConfigError(f"{key}: not valid YAML: {' '.join(str(e).split())}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def validate(c: Config) -> None:
    """Check values no type can express (positive sizes, sorted dims, existing paths)."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(c, section), name)
        if value not in choices:
            names = (str(x).lower() if isinstance(x, bool) else str(x) for x in choices)  # as YAML writes them
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(names)}")
    t, loss = c.train, c.loss
    if t.batch_size < 2:
        raise ConfigError(f"train.batch_size: {t.batch_size}; in-batch negatives need at least 2 pairs a batch")
    if not 0 <= t.seed < 2 ** 32:
        raise ConfigError(f"train.seed: {t.seed} must be in [0, 2^32)")
    if t.save_total_limit < 1:
        raise ConfigError(f"train.save_total_limit: {t.save_total_limit}; keep at least the last checkpoint (1)")
    _positive("train.lr", t.lr)
    _positive("train.grad_accum", t.grad_accum)
    _positive("train.epochs", t.epochs)
    if loss.temperature < MIN_TEMPERATURE:
        raise ConfigError(f"loss.temperature: {loss.temperature} is below the loss's minimum {MIN_TEMPERATURE}")
    _positive("loss.temperature_lr", loss.temperature_lr)
    _positive("eval.batch_size", c.eval.batch_size)
    _positive("eval.rescore_multiplier", c.eval.rescore_multiplier)
    _positive("train.log_steps", t.log_steps)
    for key, value in (("train.max_steps", t.max_steps), ("train.save_steps", t.save_steps),
                       ("train.eval_steps", t.eval_steps), ("loss.mini_batch_size", loss.mini_batch_size),
                       ("train.chunk_tokens", t.chunk_tokens),
                       ("model.max_length", c.model.max_length), ("train.max_grad_norm", t.max_grad_norm)):
        if value is not None:
            _positive(key, value)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: {t.warmup_ratio} must be in [0, 1)")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: {t.weight_decay} must not be negative")
    if c.model.dropout is not None and not 0 <= c.model.dropout < 1:
        raise ConfigError(f"model.dropout: {c.model.dropout} must be in [0, 1)")
    if c.model.dtype == "float16":
        raise ConfigError("model.dtype: float16 weights cannot be trained directly (no loss scaling); use bfloat16, "
                          "or auto (float32 weights) with train.mixed_precision: fp16")
    try:
        check_attn_implementation(c.model.attn_implementation)
    except ModelLoadError as e:
        raise ConfigError(f"model.attn_implementation: {e}") from None
    if c.model.lora is not None:
        check_lora(c.model.lora)
    if loss.matryoshka_dims or loss.matryoshka_weights is not None:
        try:
            check_dims(loss.matryoshka_dims, loss.matryoshka_weights)
        except ValueError as e:
            raise ConfigError(f"loss.matryoshka_{str(e).split(' ')[0].rstrip(':')}: {e}") from None
    if loss.quantization is not None:
        check_quantization(loss.quantization, loss.matryoshka_dims)
    if loss.kind != "infonce":
        check_distillation(c)
    elif loss.teacher_temperature is not None:
        raise ConfigError(f"loss.teacher_temperature: {loss.teacher_temperature} is for loss.kind margin_mse or kl "
                          "(teacher scores); loss.kind is infonce")
    if c.eval.dims is not None and any(d <= 0 for d in c.eval.dims):
        raise ConfigError(f"eval.dims: {c.eval.dims} must all be greater than 0")
    if bad := [p for p in c.eval.precisions if p not in PRECISIONS]:
        raise ConfigError(f"eval.precisions: {bad[0]!r} is not one of {', '.join(PRECISIONS)}")
    if not c.data.train:
        raise ConfigError("data.train: no training datasets; list at least one with a path and columns")
    for i, ds in enumerate(c.data.train):
        where = f"data.train[{i}]"
        if not ds.path:
            raise ConfigError(f"{where}.path: missing")
        bad = sorted(set(ds.columns.values()) - set(ROLES))
        if bad:
            raise ConfigError(f"{where}.columns: roles {bad} are not among {ROLES}")
        for role in ("anchor", "positive"):
            if ds.columns and role not in ds.columns.values():
                raise ConfigError(f"{where}.columns: no column is mapped to {role!r}")
        if not 0 < ds.weight <= MAX_WEIGHT:
            raise ConfigError(f"{where}.weight: {ds.weight} must be in (0, {MAX_WEIGHT}] (each epoch repeats the "
                              "dataset's rows weight times)")
        check_one_prompt(ds, where)
        if ds.hard_negatives is not None:
            check_hard_negatives(ds, f"{where}.hard_negatives")
        if _looks_local(ds.path) and not Path(ds.path).exists():
            raise ConfigError(f"{where}.path: {ds.path} does not exist")
    metrics = metric_names() + (["sts_spearman"] if c.eval.sts else [])
    if c.eval.metric not in metrics:
        close = difflib.get_close_matches(c.eval.metric, metrics, n=1)
        raise ConfigError(f"eval.metric: {c.eval.metric!r} is not a metric the evaluation reports"
                          f"{f'; did you mean {close[0]!r}?' if close else ''} (METRIC@K with METRIC one of "
                          f"{', '.join(METRICS)} and K one of {', '.join(map(str, DEFAULT_K_VALUES))}"
                          f"{'; or sts_spearman' if c.eval.sts else '; sts_spearman needs eval.sts'})")
    e = c.eval
    try:
        settings_from(e.bm25_preset, k1=e.bm25_k1, b=e.bm25_b, stemmer=e.bm25_stemmer,
                      split_identifiers=e.bm25_split_identifiers)
    except ValueError as err:
        raise ConfigError(f"eval.bm25_*: {err}") from None
    check_one_prompt(c.eval, "eval")
    if c.eval.general_tolerance < 0:
        raise ConfigError(f"eval.general_tolerance: {c.eval.general_tolerance} must not be negative")
    for i, path in enumerate(c.eval.general):
        if not Path(path).exists():
            raise ConfigError(f"eval.general[{i}]: {path} does not exist (an STS file or a BEIR folder)")
        if Path(path).is_dir() and not (Path(path) / "qrels" / f"{c.eval.general_split}.tsv").exists():
            raise ConfigError(f"eval.general[{i}]: the BEIR folder {path} has no qrels/{c.eval.general_split}.tsv "
                              "(eval.general_split)")
    check_streaming(c)
    if c.eval.data is not None and not Path(c.eval.data).is_dir():
        raise ConfigError(f"eval.data: {c.eval.data} is not a folder (a BEIR folder with corpus.jsonl, "
                          "queries.jsonl, qrels/)")


def check_quantization(q: QuantizationConfig, matryoshka_dims: list[int]) -> None:
    for key in ("binary", "int8", "alignment"):
        if getattr(q, key) < 0:
            raise ConfigError(f"loss.quantization.{key}: {getattr(q, key)} must not be negative")
    if isinstance(q.rotation_steps, bool) or not isinstance(q.rotation_steps, int) or q.rotation_steps < 0:
        raise ConfigError(f"loss.quantization.rotation_steps: {q.rotation_steps!r} must be a whole number, 0 or more")
    if q.binary == q.int8 == q.alignment == q.rotation_steps == 0:
        raise ConfigError("loss.quantization: every weight is 0 and rotation_steps is 0; give binary, int8 and/or "
                          "alignment a weight (e.g. binary: 1.0), or rotation_steps, or remove loss.quantization")
    if q.estimator not in ESTIMATORS:
        raise ConfigError(f"loss.quantization.estimator: {q.estimator!r} is not one of {', '.join(ESTIMATORS)}")
    if q.dims is not None:
        if not q.dims or min(q.dims) < 1:
            raise ConfigError(f"loss.quantization.dims: {q.dims} must be positive integers, or null for every dim")
        if matryoshka_dims and (outside := sorted(set(q.dims) - set(matryoshka_dims))):
            raise ConfigError(f"loss.quantization.dims: {outside} are not among loss.matryoshka_dims "
                              f"{matryoshka_dims}; the terms apply to the dims the loss trains")


def check_distillation(c: Config) -> None:
    """A distillation loss reads teacher scores from loaded pair files: settings of InfoNCE alone, negatives mined
    during the run (they have no scores) and streamed datasets are refused."""
    kind = c.loss.kind
    if c.loss.teacher_temperature is not None:
        _positive("loss.teacher_temperature", c.loss.teacher_temperature)
    for key in ("learnable_temperature", "symmetric"):
        if getattr(c.loss, key):
            raise ConfigError(f"loss.{key}: an InfoNCE setting; loss.kind {kind} compares each row's scores with the "
                              "teacher's (set it to false)")
    for i, ds in enumerate(c.data.train):
        if ds.hard_negatives is not None:
            raise ConfigError(f"data.train[{i}].hard_negatives: negatives mined during the run have no teacher "
                              f"scores for loss.kind {kind}; mine and score first (twinfold mine, then twinfold score) "
                              "and train on the scored file")
        if ds.streaming:
            raise ConfigError(f"data.train[{i}].streaming: loss.kind {kind} reads teacher scores from a loaded "
                              "dataset; not with streaming: true")


def check_lora(lora: LoraSettings) -> None:
    _positive("model.lora.r", lora.r)
    _positive("model.lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout: {lora.dropout} must be in [0, 1)")
    if lora.target_modules is not None and not lora.target_modules:
        raise ConfigError("model.lora.target_modules: empty; list layer names (e.g. [q_proj, v_proj]) or leave it "
                          "null for the model family's attention projections")


def check_streaming(c: Config) -> None:
    """A run with a streamed dataset: a known number of steps, no whole-data steps before training, a buffer that
    holds a batch."""
    streamed = [i for i, ds in enumerate(c.data.train) if ds.streaming]
    if not streamed:
        return
    where = f"data.train[{streamed[0]}].streaming"
    if c.train.max_steps is None:
        raise ConfigError(f"{where}: a stream has no known length; set train.max_steps")
    for i in streamed:
        if c.data.train[i].hard_negatives is not None:
            raise ConfigError(f"data.train[{i}]: hard_negatives are mined over the whole dataset before training; "
                              "not with streaming: true (mine with python -m twinfold.train.mine first)")
    q = c.loss.quantization
    if q is not None and q.rotation_steps:
        raise ConfigError(f"loss.quantization.rotation_steps: the code rotation is fitted on the loaded training "
                          f"pairs after training; not with a streamed dataset ({where})")
    for key in ("dedup", "drop_eval_overlap"):
        if getattr(c.data, key):
            raise ConfigError(f"data.{key}: compares every training pair before training; not with a streamed "
                              f"dataset ({where})")
    if c.data.shuffle_buffer < c.train.batch_size:
        raise ConfigError(f"data.shuffle_buffer: {c.data.shuffle_buffer} rows cannot hold a batch of "
                          f"train.batch_size {c.train.batch_size}")


def check_one_prompt(section, where: str) -> None:
    """A query prompt is given by name or as a text, not both."""
    if section.query_prompt_name is not None and section.query_prompt is not None:
        raise ConfigError(f"{where}: query_prompt_name {section.query_prompt_name!r} and query_prompt "
                          f"{section.query_prompt!r} both set; give the name of a model prompt or a prompt text")


def check_hard_negatives(ds: DatasetConfig, where: str) -> None:
    """Validate `ds.hard_negatives`; errors name `where` (a config key or "options")."""
    h = ds.hard_negatives
    for name, choices in (("candidates", ("dense", "bm25")), ("sampling", ("top", "random"))):
        if getattr(h, name) not in choices:
            raise ConfigError(f"{where}.{name}: {getattr(h, name)!r} is not one of {', '.join(choices)}")
    _positive(f"{where}.num_negatives", h.num_negatives)
    if not 0 <= h.range_min < h.range_max:
        raise ConfigError(f"{where}: range_min {h.range_min} and range_max {h.range_max} must satisfy "
                          "0 <= range_min < range_max")
    if h.range_max - h.range_min < h.num_negatives:
        raise ConfigError(f"{where}: the rank range [{h.range_min}, {h.range_max}) holds fewer than "
                          f"num_negatives {h.num_negatives} candidates; widen it")
    if h.max_score_ratio is not None and not 0 < h.max_score_ratio <= 1:
        raise ConfigError(f"{where}.max_score_ratio: {h.max_score_ratio} must be in (0, 1] (or null: no guard)")
    if h.teacher_margin < 0:
        raise ConfigError(f"{where}.teacher_margin: {h.teacher_margin} must not be negative")
    if h.teacher_margin and h.teacher is None:
        raise ConfigError(f"{where}.teacher_margin: set without a teacher; name one (a cross-encoder or bi-encoder)")
    if h.corpus is not None and not Path(h.corpus).exists():
        raise ConfigError(f"{where}.corpus: {h.corpus} does not exist (a BEIR folder or a JSONL file of documents)")
    if "negative" in ds.columns.values():
        raise ConfigError(f"{where}: the dataset already maps a column to 'negative'; mine or bring negatives, "
                          "not both")


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: {value} must be greater than 0")


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".jsonl", ".json", ".csv", ".parquet", ".tsv")


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value, key: str):
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m):
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is not None:
                return m.group(2)
            raise ConfigError(f"{key}: environment variable {m.group(1)} is not set (used in {value!r})")
        return _ENV.sub(sub, value)
    return value


def _build(cls, raw, where: str):
    """Instantiate dataclass `cls` from a mapping, checking keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # e.g. `bool | str`: the first of the types the value is
            try:
                return _coerce(value, alternative, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        if isinstance(value, str) and args[0] in (int, float, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return number
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return getattr(value, "text", str(value))  # a number as it was written
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
