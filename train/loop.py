"""The training run: set-up, then one step read top to bottom, checkpoints, evaluation and export."""
import json
import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from twinfold.losses import Distillation, InfoNCE, Matryoshka, Quantized, cached_backward, uncached_backward
from twinfold.models import BiEncoder
from twinfold.models.bi_encoder import freeze_unused
from twinfold.models.files.atomic import atomic_write_bytes
from twinfold.models.lora import LoraSettings, add_lora, check_same_adapter, has_lora, make_trainable, merged_encoder
from twinfold.models.runtime import cpu_has_bf16, keep_freed_memory, share_cpu_cores
from twinfold.train.checkpoint import checkpoint_streams, load_checkpoint, prune_checkpoints, save_checkpoint
from twinfold.train.config import Config, ConfigError, save_config
from twinfold.train.data.loader import TrainingBatches, dataset_tokenizers
from twinfold.train.data.pairs import PairDataset
from twinfold.train.data.prepare import prepare_data
from twinfold.train.resume import claim_run_folder, decided_on_main, resume_point
from twinfold.train.rotation import add_code_rotation
from twinfold.train.signals import StopOnSignal, StoppedBySignal

log = logging.getLogger("twinfold")
EVAL_KEYS = ("model", "dim", "precision", "ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100",
             "storage_mb_per_million_docs", "bm25")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def build_model(cfg: Config) -> BiEncoder:
    """The model to train: float32 master weights unless `model.dtype` names the weights' dtype."""
    m = cfg.model
    model = BiEncoder.from_pretrained(
        m.name_or_path, pooling=m.pooling, normalize=m.normalize, similarity=m.similarity, max_length=m.max_length,
        dropout=m.dropout, query_prefix=m.query_prefix, document_prefix=m.document_prefix, append_eos=m.append_eos,
        dtype="float32" if m.dtype == "auto" else m.dtype, attn_implementation=m.attn_implementation, unpad=m.unpad,
        allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code,
    )
    for key, dims in (("loss.matryoshka_dims", cfg.loss.matryoshka_dims), ("eval.dims", cfg.eval.dims or [])):
        if dims and max(dims) > model.dim:
            raise ConfigError(f"{key}: {max(dims)} is larger than the model's dimension {model.dim}")
    positions = getattr(model.encoder.config, "max_position_embeddings", None)
    if m.max_length and positions and m.max_length > positions:
        raise ConfigError(f"model.max_length: {m.max_length} is more than the {positions} positions "
                          f"{m.name_or_path} has")
    model.settings.matryoshka_dims = list(cfg.loss.matryoshka_dims)
    try:
        use_lora(model, m.lora, m.name_or_path)
    except ValueError as e:
        raise ConfigError(f"model.lora.{e}") from None
    if m.gradient_checkpointing:
        if not model.encoder.supports_gradient_checkpointing:
            raise ConfigError(f"model.gradient_checkpointing: {type(model.encoder).__name__} ({m.name_or_path}) does "
                              "not support gradient checkpointing in transformers; set it to false")
        model.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def export_dtype(cfg: Config, model: BiEncoder) -> torch.dtype:
    """The dtype of the trained model's export: `model.dtype`, and for auto the base checkpoint's."""
    return getattr(torch, model.checkpoint_dtype if cfg.model.dtype == "auto" else cfg.model.dtype)


def use_lora(model: BiEncoder, lora: LoraSettings | None, base_name: str) -> None:
    """Train only a LoRA adapter (`lora` set: a new one, or the loaded one of an adapter folder), or the whole
    encoder (`lora` null: a loaded adapter is merged into it first). ValueError names the `lora` setting at fault."""
    if has_lora(model.encoder) and lora is None:
        model.encoder = merged_encoder(model.encoder).requires_grad_(True)
        freeze_unused(model.encoder)
        return
    if lora is None:
        return
    if has_lora(model.encoder):
        check_same_adapter(model.encoder, lora)
        make_trainable(model.encoder)
    else:
        model.encoder = add_lora(model.encoder, lora, base_name)
    model.head.requires_grad_(False)  # the adapter alone trains


def build_loss(cfg: Config, similarity: str = "cosine") -> torch.nn.Module:
    """The configured loss on the model's `similarity` (`EncoderSettings.similarity`: what search ranks by)."""
    c = cfg.loss
    if c.kind == "infonce":
        loss = InfoNCE(c.temperature, learnable=c.learnable_temperature, symmetric=c.symmetric, similarity=similarity)
    else:
        loss = Distillation(c.kind, c.temperature, c.teacher_temperature or c.temperature, similarity)
    q = c.quantization
    if q is not None and (q.binary or q.int8 or q.alignment):
        loss = Quantized(loss, binary=q.binary, int8=q.int8, dims=q.dims, estimator=q.estimator,
                         alignment=q.alignment)
    if not c.matryoshka_dims:
        return loss
    return Matryoshka(loss, c.matryoshka_dims, c.matryoshka_weights, normalize=similarity == "cosine")


def lr_lambda(total: int, warmup: int, kind: str):
    """Linear warm-up to the peak, then linear or cosine decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(model: BiEncoder, loss_fn: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:  # the learnable temperature: its own rate (one lr moves log temperature by about lr a step)
        groups.append({"params": loss_params, "weight_decay": 0.0, "lr": cfg.loss.temperature_lr})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)  # one kernel per step on CPU and GPU


def make_accelerator(mixed_precision: str | None = None) -> Accelerator:
    """An Accelerator; processes launched without GPUs join a gloo group (accelerate would run them alone).

    `mixed_precision` (train.mixed_precision) null follows the launcher (`accelerate launch`'s
    `--mixed_precision` or config file); set, it wins, and a launcher that says otherwise is reported.
    On CPUs, `accelerate launch` pins every process to one thread (OMP_NUM_THREADS=1); twinfold gives each
    process its share of the cores instead (`TWINFOLD_NUM_THREADS` overrides), and makes malloc reuse the
    step's freed activations (`models.runtime.keep_freed_memory`).
    """
    cpu_only = not torch.cuda.is_available()
    if cpu_only:
        keep_freed_memory()
        share_cpu_cores()
        if mixed_precision == "bf16" and not cpu_has_bf16():
            log.warning("train.mixed_precision=bf16 on a CPU without bf16 units (avx512_bf16/amx_bf16): "
                        "expect it to be far slower than fp32")
    # other processes wait while the main one evaluates: allow long evaluations before collectives time out
    patience = InitProcessGroupKwargs(timeout=timedelta(hours=3))
    accelerator = Accelerator(cpu=cpu_only and int(os.environ.get("WORLD_SIZE", "1")) > 1,
                              mixed_precision=mixed_precision, kwargs_handlers=[patience])
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mixed_precision is not None and launcher not in (None, mixed_precision) and accelerator.is_main_process:
        log.warning("train.mixed_precision: %s overrides the launcher's mixed_precision %s (leave "
                    "train.mixed_precision unset to follow the launcher)", mixed_precision, launcher)
    return accelerator


def disk_needed(model: BiEncoder, save_total_limit: int) -> int:
    """Bytes a run writes at most: `save_total_limit` checkpoints and the best one, each with the trained weights
    and AdamW's two moments (of a LoRA model: its adapter), and the export with all weights."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 3 * trained_bytes * (save_total_limit + 1) + weight_bytes


def check_output_dir(path: Path, need_bytes: int) -> None:
    """Fail before training if the output folder cannot be written or lacks room for the checkpoints."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".tmp-write-test"  # a leftover of a crash here is ignored like any `.tmp-*`
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot write to {path}: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    # a resumed run's own checkpoints make room as newer ones replace them
    held = sum(f.stat().st_size for f in (path / "checkpoints").rglob("*") if f.is_file() and not f.is_symlink())
    if free + held < need_bytes:
        raise ConfigError(f"train.output_dir: {path} has {free / 2**30:.2f} GiB free; checkpoints and the export "
                          f"need about {need_bytes / 2**30:.2f} GiB (lower train.save_total_limit or free space)")


@dataclass
class RunState:
    """Where a run stands; saved with every checkpoint (`trainer_state.json`)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # the plan's next batch in `epoch`
    best: dict | None = None  # {"step", "score"} of the best evaluation so far
    evals: list[dict] = field(default_factory=list)
    base: list[dict] = field(default_factory=list)  # the base model's evaluation rows
    general_base: list[dict] = field(default_factory=list)  # the base model's scores on eval.general
    last_rows: list[dict] | None = None  # the latest evaluation's rows (not saved)

    def saved(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "last_rows"}

    @classmethod
    def restored(cls, saved: dict) -> "RunState":
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


@dataclass
class Run:
    """What `set_up` builds for `run_steps` and `finish`."""

    cfg: Config
    accelerator: Accelerator
    model: BiEncoder
    wrapped: torch.nn.Module  # the model as `accelerator.prepare` wrapped it (DDP, FSDP)
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: TrainingBatches
    total_steps: int
    state: RunState
    recipe: dict  # the config and the content of its data, as checkpoints record them
    datasets: list
    data_report: dict
    evaluator: object | None  # train.evaluate.RetrievalEvaluator, on the main process
    tracker: object | None  # a wandb run, on the main process
    lock: object | None  # train.lock.RunLock, on the main process
    general: list = field(default_factory=list)  # train.evaluate.GeneralEvaluator of eval.general, main process
    position: dict | None = None  # streamed runs: where this process's streams stand

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)


def train(cfg: Config) -> Path:
    """Run a whole recipe; return the exported model folder `OUTPUT/final`."""
    try:
        run = set_up(cfg)
    except KeyboardInterrupt:  # Ctrl-C while preparing: no step was taken, nothing to resume
        raise StoppedBySignal(signal.SIGINT, "stopped by SIGINT before the first step; no checkpoint was written "
                                             "(start the run again)") from None
    stop = StopOnSignal().install()
    try:
        run_steps(run, stop)
    except BaseException:  # stopped or failed: the folder is free again (its checkpoints resume the run)
        if run.lock is not None:
            run.lock.release()
        raise
    finally:  # a run that raises (a non-finite loss, say) gives the process its signal handlers back too
        stop.uninstall()
    return finish(run)


def set_up(cfg: Config) -> Run:
    """Model, data, loss, optimizer and schedule; the run folder claimed; resumed from its newest intact
    checkpoint where `train.resume`; the base model evaluated on a new run."""
    t = cfg.train
    accelerator = make_accelerator(t.mixed_precision)
    if t.batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by the {accelerator.num_processes} "
                          "processes")
    set_seed(t.seed)
    model = build_model(cfg)
    tokenizers = dataset_tokenizers(cfg, model)
    lock = claim_run_folder(Path(t.output_dir), t.resume) if accelerator.is_main_process else None
    try:
        return set_up_claimed(cfg, accelerator, model, tokenizers, lock)
    except BaseException:  # the folder is free again for another run, or this process's next try
        if lock is not None:
            lock.release()
        raise


def set_up_claimed(cfg: Config, accelerator: Accelerator, model: BiEncoder, tokenizers, lock) -> Run:
    """`set_up` once the run folder is claimed: everything that reads the data or writes the folder."""
    t = cfg.train
    out = Path(t.output_dir)
    main = accelerator.is_main_process
    if main:
        check_output_dir(out, disk_needed(model, t.save_total_limit))
        save_config(cfg, out / "config.yaml")
    general = build_general(cfg) if main else []  # the sets are read (and checked) before any data work
    log.info("preparing %d training datasets", len(cfg.data.train))
    datasets, data_report = prepare_data(cfg, model, out, accelerator)  # mining, eval-overlap and duplicate checks
    batches = TrainingBatches(cfg, model, datasets, accelerator, tokenizers)
    loss_fn = build_loss(cfg, model.settings.similarity).to(accelerator.device)
    optimizer = build_optimizer(model, loss_fn, cfg)
    total_steps = t.max_steps or batches.batches_in(t.epochs) // t.grad_accum  # streamed runs set max_steps
    if total_steps == 0:
        raise ConfigError(f"train.grad_accum: {t.grad_accum} batches a step, but {t.epochs} epochs of the data give "
                          f"{batches.batches_in(t.epochs)} batches of {t.batch_size}; lower train.grad_accum or "
                          "train.batch_size, or raise train.epochs")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, math.ceil(t.warmup_ratio * total_steps), t.scheduler))
    recipe = {**cfg.to_dict(), "data_content": {ds.name: ds.fingerprint for ds in datasets
                                                if isinstance(ds, PairDataset)}}
    run = Run(cfg, accelerator, model, model, loss_fn, optimizer, scheduler, batches, total_steps, RunState(),
              recipe, datasets, data_report, evaluator=None, tracker=None, lock=lock, general=general)
    if t.resume:
        resume(run)
    run.wrapped, run.optimizer = accelerator.prepare(model, optimizer)
    if main:
        run.evaluator = build_evaluator(cfg, out)
        if run.state.step == 0 and run.evaluator is not None:
            run.state.base = run.evaluator(model, "base")
            write_metrics(out / "metrics.jsonl", {"step": 0, "eval": run.state.base})
        if run.state.step == 0 and run.general:
            run.state.general_base = score_general(run.general, model, "base")
            write_metrics(out / "metrics.jsonl", {"step": 0, "general": run.state.general_base})
        run.tracker = start_wandb(cfg, out, resume=run.state.step > 0) if cfg.log.wandb else None
    return run


def resume(run: Run) -> None:
    """Continue from the newest intact checkpoint, if any: weights, optimizer, schedule, RNG and data position."""
    accelerator, out = run.accelerator, run.out
    found, changes = decided_on_main(accelerator, lambda: resume_point(out, run.recipe, accelerator.num_processes))
    if not found:
        return
    saved, rng_states = load_checkpoint(found, run.model, run.optimizer, run.scheduler, run.loss_fn,
                                        accelerator.scaler)
    run.state = RunState.restored(saved)
    mine = rng_states[accelerator.process_index]
    torch.set_rng_state(mine["cpu"])
    if torch.cuda.is_available() and mine.get("cuda") is not None:
        torch.cuda.set_rng_state(mine["cuda"])
    run.position = checkpoint_streams(found)[accelerator.process_index] if run.batches.streamed else None
    if accelerator.is_main_process:
        log.info("resumed from %s (step %d)", found, run.state.step)
        drop_metrics_after(out / "metrics.jsonl", run.state.step)
        if changes:  # harmless ones (resume_point refuses the others): recorded with the run
            log.info("recipe changes since that checkpoint: %s", ", ".join(changes))
            write_metrics(out / "metrics.jsonl", {"step": run.state.step, "resumed_with_changes": changes})


def run_steps(run: Run, stop: StopOnSignal) -> None:
    """The training loop: one optimizer step, then the bookkeeping that is due, until `total_steps`."""
    cfg, state = run.cfg, run.state
    step = TrainStep(cfg, run.accelerator, run.model, run.wrapped, run.loss_fn, run.optimizer, run.scheduler)
    loader = run.batches.loader(state.epoch, state.batch, run.position)
    progress = tqdm(total=run.total_steps, initial=state.step, disable=not run.accelerator.is_main_process,
                    desc="train")
    window = Window()
    run.wrapped.train()
    log.info("training from step %d to step %d", state.step, run.total_steps)
    while state.step < run.total_steps:
        inputs = [next(loader) for _ in range(cfg.train.grad_accum)]  # their gradients add up to one update
        lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on inside the step)
        loss = step(inputs)  # stays on the device until the window is logged: no wait for the device here
        state.step, state.epoch, state.batch = state.step + 1, inputs[-1]["epoch"], inputs[-1]["index"] + 1
        run.position = inputs[-1].get("position")
        record = {"step": state.step, "epoch": state.epoch, "lr": lr, "loss": loss}
        if cfg.loss.learnable_temperature:
            info_nce = next(m for m in run.loss_fn.modules() if isinstance(m, InfoNCE))  # inside any wrappers
            record["temperature"] = info_nce.temperature.detach().clone()
        window.add(record, sum(x["pairs"] for x in inputs))
        progress.update(1)
        after_step(run, window, stop, progress)
    progress.close()


def after_step(run: Run, window: "Window", stop: StopOnSignal, progress) -> None:
    """The bookkeeping after a step, each part when it is due: log, evaluate, checkpoint, stop on a signal.
    Each needs the losses on the host, so they wait for the device together."""
    cfg, t, state, accelerator = run.cfg, run.cfg.train, run.state, run.accelerator
    last = state.step == run.total_steps
    evaluate_now = cfg.eval.data is not None and (last or bool(t.eval_steps and state.step % t.eval_steps == 0)) \
        and not (last and rotates(cfg))  # the rotated model's evaluation is `finish`'s
    save_now = last or bool(t.save_steps and state.step % t.save_steps == 0)
    log_now = last or evaluate_now or save_now or state.step % t.log_steps == 0
    # one process sees a signal at once; several agree on it (a collective) where they log anyway
    signum = stop.requested(accelerator) if accelerator.num_processes == 1 or log_now else None
    logged = window.flush(accelerator, cfg) if log_now or signum else []
    timings, improved = {}, False
    if evaluate_now and accelerator.is_main_process:
        started = time.perf_counter()
        improved = evaluate(run)
        timings["eval_s"] = time.perf_counter() - started
    if evaluate_now and accelerator.num_processes > 1:  # every process must agree on saving: it gathers RNG states
        improved = broadcast_object_list([improved])[0]
    if save_now or signum or (t.save_steps and improved):
        timings["checkpoint_s"] = checkpoint(run)
    if logged:
        logged[-1].update(timings)  # evaluation and checkpoint time, apart from training throughput
        progress.set_postfix(loss=f"{logged[-1]['loss']:.4f}", pairs_s=f"{logged[-1]['pairs_per_s']:.1f}")
    for entry in logged if accelerator.is_main_process else []:
        write_metrics(run.out / "metrics.jsonl", entry)
        if run.tracker:
            run.tracker.log(entry, step=entry["step"])
    if signum:
        progress.close()
        raise stop.stopped(signum, state.step, run.out / "checkpoints" / f"step-{state.step}")
    if timings:
        window.restart()  # throughput counts training time only


def evaluate(run: Run) -> bool:
    """Evaluate the model now (main process); record the rows; return whether the headline metric improved."""
    cfg, state = run.cfg, run.state
    rows = run.evaluator(run.model, f"step-{state.step}")
    score = headline(rows, cfg.eval.metric)
    state.evals.append({"step": state.step, cfg.eval.metric: score})
    improved = state.best is None or score > state.best["score"]
    if improved:
        state.best = {"step": state.step, "score": score}
    state.last_rows = rows
    write_metrics(run.out / "metrics.jsonl", {"step": state.step, "eval": rows})
    if run.tracker:
        run.tracker.log({f"eval/{cfg.eval.metric}": score}, step=state.step)
    return improved


def rotates(cfg: Config) -> bool:
    """Whether the run ends by fitting the code rotation (`train.rotation`)."""
    return cfg.loss.quantization is not None and cfg.loss.quantization.rotation_steps > 0


def finish(run: Run) -> Path:
    """The code rotation (where configured), the final evaluation, the export `OUTPUT/final` with what training
    recorded, and the report."""
    accelerator, cfg, state, out = run.accelerator, run.cfg, run.state, run.out
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        dtype = export_dtype(cfg, run.model)
        if dtype != run.model.encoder.dtype:  # training is over: the export is in the base's dtype (or model.dtype's)
            run.model.to(dtype)
            state.last_rows = None  # the final rows measure the export itself
        rotation = None
        if rotates(cfg):
            rotation = add_code_rotation(run.model, cfg, run.datasets)
            state.last_rows = None  # the final rows measure the rotated model
        general = compare_general(run.state.general_base, score_general(run.general, run.model, "final"),
                                  cfg.eval.general_tolerance) if run.general else []
        if general:
            write_metrics(out / "metrics.jsonl", {"step": state.step, "general": general})
        rows = []
        if run.evaluator is not None:
            if state.last_rows is None:  # resumed after the last checkpoint, or converted
                state.last_rows = run.evaluator(run.model, f"step-{state.step}")
            final_rows = [dict(r, model="final") for r in state.last_rows]
            rows = state.base + final_rows + (run.evaluator.bm25_rows() if cfg.eval.bm25 else [])
        run.model.save_pretrained(final, info=run_info(cfg, run.datasets, state, rows, run.data_report, general,
                                                        run.evaluator, rotation))
        if run.evaluator is not None:
            from twinfold.train.eval.report import write_report

            write_report(rows, out / "eval", info={**run.evaluator.describe(), "config": cfg.to_dict(),
                                                   **run.data_report, **general_info(cfg, general)})
        if run.tracker:
            run.tracker.finish()
        run.lock.release()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


class TrainStep:
    """One optimizer step, read top to bottom in `__call__`.

    Its inputs come from `train.batches`: per role, this process's texts sorted by token length and cut into
    padded chunks by a token budget (in cached mode, at most `loss.mini_batch_size` texts each). The loss sees
    the embeddings back in batch order, so the in-batch negatives are exactly the sampled ones. Nothing here
    waits for the device: the loss is returned as a device tensor.
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, model: BiEncoder, wrapped: torch.nn.Module,
                 loss_fn: torch.nn.Module, optimizer, scheduler):
        self.cfg, self.accelerator, self.model, self.wrapped = cfg, accelerator, model, wrapped
        self.loss_fn, self.optimizer, self.scheduler = loss_fn, optimizer, scheduler

    def __call__(self, inputs: list[dict]) -> torch.Tensor:
        """Forward + loss + backward of each batch (gradients accumulate), then clip and update.

        `inputs` holds `train.grad_accum` assembled batches (`train.batches.assemble`). Returns this process's
        loss averaged over them, on the device.
        """
        cfg, accelerator, device = self.cfg, self.accelerator, self.accelerator.device
        losses = []
        for micro, batch in enumerate(inputs):
            order = {role: o.to(device, non_blocking=True) for role, o in batch["order"].items()}
            keys = {role: k.to(device, non_blocking=True) for role, k in batch["keys"].items() if role != "anchor"} \
                if cfg.loss.mask_false_negatives else {}
            if "scores" in batch:  # the teacher's, for a distillation loss: rows in batch order, as the loss sees them
                keys["scores"] = batch["scores"].to(device, non_blocking=True)

            def loss_in_batch_order(embeddings: dict[str, torch.Tensor], keys) -> torch.Tensor:
                restored = {role: torch.empty_like(e).index_copy(0, order[role], e) for role, e in embeddings.items()}
                return self.loss_fn(restored, keys)

            sync = nullcontext() if micro == len(inputs) - 1 else accelerator.no_sync(self.wrapped)
            with sync:
                if cfg.loss.mini_batch_size:
                    loss = cached_backward(self.embed, batch["chunks"], loss_in_batch_order, keys=keys or None,
                                           scale=1 / len(inputs), backward=accelerator.backward,
                                           no_sync=lambda: accelerator.no_sync(self.wrapped),
                                           check_replay=cfg.loss.check_replay)
                else:
                    loss = uncached_backward(self.embed, batch["chunks"], loss_in_batch_order, keys=keys or None,
                                             scale=1 / len(inputs), backward=accelerator.backward)
            losses.append(loss)
        if cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(self.wrapped.parameters(), cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    def embed(self, features: dict[str, torch.Tensor], role: str) -> torch.Tensor:
        """One padded chunk through the (possibly DDP-wrapped) model."""
        return self.wrapped(**{k: v.to(self.accelerator.device, non_blocking=True) for k, v in features.items()})


class Window:
    """Step records since the last log, with their losses still on the device; the pairs and training time."""

    def __init__(self):
        self.records: list[dict] = []
        self.pairs, self.start = 0, time.perf_counter()

    def add(self, record: dict, pairs: int) -> None:
        self.records.append(record)
        self.pairs += pairs

    def restart(self) -> None:
        """Start timing again (after a flush, evaluation or checkpoint: those are not training time)."""
        self.start = time.perf_counter()

    def flush(self, accelerator: Accelerator, cfg: Config) -> list[dict]:
        """The window's records with host values (one wait for the device, one all-reduce); raise on a
        non-finite loss, naming its step."""
        if not self.records:
            return []
        losses = accelerator.reduce(torch.stack([r["loss"] for r in self.records]), reduction="mean").tolist()
        rate = self.pairs / max(time.perf_counter() - self.start, 1e-9)
        out = []
        for record, loss in zip(self.records, losses):
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at step {record['step']}; stopping. The last good checkpoint "
                                    f"is kept in {Path(cfg.train.output_dir) / 'checkpoints'}; lower train.lr or "
                                    "check the data")
            out.append({**record, "loss": loss, "pairs_per_s": rate,
                        **({"temperature": float(record["temperature"])} if "temperature" in record else {})})
        self.records, self.pairs = [], 0
        self.restart()
        return out


def headline(rows: list[dict], metric: str) -> float:
    """The metric at the largest dim in float32: the number that picks the best checkpoint."""
    full = [r for r in rows if r["precision"] == "float32"] or rows
    return max(full, key=lambda r: r["dim"])[metric]


def checkpoint(run: Run) -> float:
    """Save on the main process with every process's RNG state (and stream position, in streamed runs); keep the
    last K and the best. Returns seconds taken."""
    started = time.perf_counter()
    accelerator, state, out = run.accelerator, run.state, run.out
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    mine = [(rng, run.position)]
    rng_states, positions = zip(*(gather_object(mine) if accelerator.num_processes > 1 else mine))
    if accelerator.is_main_process:
        try:
            save_checkpoint(out, state.step, run.model, run.optimizer, run.scheduler, run.loss_fn, list(rng_states),
                            state.saved(), run.recipe, accelerator.scaler,
                            streams=list(positions) if run.position is not None else None)
        except (OSError, RuntimeError) as e:  # a full disk, say; torch.save reports write errors as RuntimeError
            raise TrainingError(f"cannot write the checkpoint of step {state.step} in {out / 'checkpoints'}: {e}; "
                                "the previous checkpoints are kept: free space, then resume with train.resume=true") \
                from e
        best = out / "checkpoints" / f"step-{state.best['step']}" if state.best else None
        prune_checkpoints(out, run.cfg.train.save_total_limit, keep=best)
    accelerator.wait_for_everyone()
    return time.perf_counter() - started


def build_evaluator(cfg: Config, out: Path):
    if cfg.eval.data is None:
        return None
    from twinfold.train.eval.beir import load_beir
    from twinfold.train.eval.bm25 import settings_from
    from twinfold.train.evaluate import RetrievalEvaluator

    e = cfg.eval
    data = load_beir(e.data, e.split, ignore_identical_ids=e.ignore_identical_ids)
    dims = e.dims or cfg.loss.matryoshka_dims or None
    bm25 = settings_from(e.bm25_preset, k1=e.bm25_k1, b=e.bm25_b, stemmer=e.bm25_stemmer,
                         split_identifiers=e.bm25_split_identifiers)
    return RetrievalEvaluator(data, dims=dims, precisions=e.precisions, batch_size=e.batch_size, sts=e.sts,
                              out_dir=out / "eval", show_progress_bar=True, compute=e.compute, bm25=bm25,
                              query_prompt_name=e.query_prompt_name, query_prompt=e.query_prompt,
                              rescore_multiplier=e.rescore_multiplier)


def build_general(cfg: Config) -> list:
    """The evaluators of `eval.general` (none when it is empty)."""
    from twinfold.train.evaluate import GeneralEvaluator

    return [GeneralEvaluator(path, cfg.eval.general_split, cfg.eval.batch_size) for path in cfg.eval.general]


def score_general(evaluators: list, model: BiEncoder, name: str) -> list[dict]:
    """One row per general set: {"data", "metric", "model": name, "score"}."""
    rows = [{"data": g.path, "metric": g.metric, "model": name, "score": g(model)} for g in evaluators]
    for r in rows:
        log.info("general %s (%s) %s: %.4f", r["data"], r["metric"], name, r["score"])
    return rows


def compare_general(base: list[dict], final: list[dict], tolerance: float) -> list[dict]:
    """Per general set the base's and the final model's score; a warning for each that fell more than `tolerance`."""
    out = []
    base_of = {r["data"]: r for r in base}
    for f in final:
        if (b := base_of.get(f["data"])) is None:  # a set added to a resumed run: no base score to compare
            continue
        fell = b["score"] - f["score"] > tolerance
        if fell:
            log.warning("eval.general: %s (%s) fell from %.4f (base) to %.4f (final), more than "
                        "eval.general_tolerance %g", f["data"], f["metric"], b["score"], f["score"], tolerance)
        out.append({"data": f["data"], "metric": f["metric"], "base": b["score"], "final": f["score"],
                    "change": f["score"] - b["score"], "fell_beyond_tolerance": fell})
    return out


def general_info(cfg: Config, general: list[dict]) -> dict:
    """What the report and twinfold.json record of `eval.general` (nothing when it is empty)."""
    return {"general": {"tolerance": cfg.eval.general_tolerance, "results": general}} if general else {}


def run_info(cfg: Config, datasets, state: RunState, rows: list[dict], data_report: dict,
             general: list[dict] = (), evaluator=None, rotation: dict | None = None) -> dict:
    """What twinfold.json (and the model card) records about training: recipe, data, checks and eval results."""
    t = cfg.train
    info = {"training": {"base_model": cfg.model.name_or_path, "steps": state.step,
                         "data": [{**({"name": d.name, "pairs": len(d), "negatives_per_pair": d.num_negatives}
                                     if isinstance(d, PairDataset) else {"name": d.name, "streamed": True}),
                                   **{k: getattr(c, k) for k in ("query_prompt_name", "query_prompt")
                                      if getattr(c, k) is not None}}
                                  for d, c in zip(datasets, cfg.data.train)],
                         "batch_size": t.batch_size, "lr": t.lr, "epochs": t.epochs, "max_steps": t.max_steps,
                         "warmup_ratio": t.warmup_ratio, "seed": t.seed, "loss": cfg.to_dict()["loss"],
                         **data_report, **({"code_rotation": rotation} if rotation else {})}}
    if rows:
        info["eval"] = {"data": cfg.eval.data, "split": cfg.eval.split, "results": [
            {k: r[k] for k in EVAL_KEYS if k in r} for r in rows]}
        if evaluator is not None:
            info["eval"].update({k: evaluator.describe()[k] for k in ("k_values", "rescore_multiplier")})
    return {**info, **general_info(cfg, list(general))}


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget the records of steps that a resumed run will do again, and a last line torn by a crash mid-write."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the line a crash cut off
                log.warning("%s:%d: a torn last line (the run was killed while writing it) is dropped", path, n)
                continue
            raise TrainingError(f"{path}:{n}: not valid JSON; the run's metrics file was edited, fix or remove "
                                "that line to resume") from None
        if record["step"] <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def write_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def start_wandb(cfg: Config, out: Path, resume: bool):
    import wandb

    mode = cfg.log.wandb_mode or os.environ.get("WANDB_MODE")
    return wandb.init(project=cfg.log.wandb_project, name=cfg.log.run_name, config=cfg.to_dict(), dir=str(out),
                      mode=mode, resume="allow" if resume else None)
