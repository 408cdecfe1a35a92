"""The training run: set-up, then one step read top to bottom, checkpoints, evaluation and export."""
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from losses import InfoNCE, Matryoshka, cached_backward, text_keys, uncached_backward
from models import BiEncoder
from models.runtime import keep_freed_memory
from train.checkpoint import complete_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from train.config import Config, ConfigError, save_config
from train.prepare import prepare_data
from train.sampler import BatchPlan

log = logging.getLogger("twinfold")
EVAL_KEYS = ("model", "dim", "precision", "ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100",
             "storage_mb_per_million_docs", "bm25")
KIND = {"anchor": "query", "positive": "document", "negative": "document"}


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def build_model(cfg: Config) -> BiEncoder:
    m = cfg.model
    model = BiEncoder.from_pretrained(
        m.name_or_path, pooling=m.pooling, normalize=m.normalize, max_length=m.max_length, dropout=m.dropout,
        query_prefix=m.query_prefix, document_prefix=m.document_prefix, allow_pickle=m.allow_pickle,
        trust_remote_code=m.trust_remote_code,
    )
    dims = cfg.loss.matryoshka_dims
    if dims and dims[0] > model.dim:
        raise ConfigError(f"loss.matryoshka_dims: {dims[0]} is larger than the model's dimension {model.dim}")
    model.settings.matryoshka_dims = list(dims)
    if m.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable()
    return model


def build_loss(cfg: Config) -> torch.nn.Module:
    c = cfg.loss
    loss = InfoNCE(c.temperature, learnable=c.learnable_temperature, symmetric=c.symmetric)
    return Matryoshka(loss, c.matryoshka_dims, c.matryoshka_weights) if c.matryoshka_dims else loss


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
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)  # one kernel per step on CPU and GPU


def report_truncation(model: BiEncoder, datasets) -> None:
    """Say once how many training texts exceed `max_length` tokens (they are truncated, not dropped)."""
    for ds in datasets:
        counts = {"anchor": model.count_truncated(ds.anchor, KIND["anchor"]),
                  "positive": model.count_truncated(ds.positive, KIND["positive"])}
        if any(counts.values()):
            log.warning("%s: %d of %d anchors and %d of %d positives exceed max_length %d tokens and are truncated",
                        ds.name, counts["anchor"], len(ds), counts["positive"], len(ds), model.max_length)


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """An Accelerator; processes launched without GPUs join a gloo group (accelerate would run them alone).

    On CPUs, `accelerate launch` pins every process to one thread (OMP_NUM_THREADS=1); twinfold gives each
    process its share of the cores instead (`TWINFOLD_NUM_THREADS` overrides), and makes malloc reuse the
    step's freed activations (`models.runtime.keep_freed_memory`).
    """
    cpu_only = not torch.cuda.is_available()
    if cpu_only:
        keep_freed_memory()
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        share = max(1, len(os.sched_getaffinity(0)) // local_processes)
        torch.set_num_threads(int(os.environ.get("TWINFOLD_NUM_THREADS", share)))
    # other processes wait while the main one evaluates: allow long evaluations before collectives time out
    patience = InitProcessGroupKwargs(timeout=timedelta(hours=3))
    return Accelerator(cpu=cpu_only and int(os.environ.get("WORLD_SIZE", "1")) > 1, mixed_precision=mixed_precision,
                       kwargs_handlers=[patience])


def check_output_dir(path: Path, need_bytes: int) -> None:
    """Fail before training if the output folder cannot be written or lacks room for the checkpoints."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot write to {path}: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise ConfigError(f"train.output_dir: {path} has {free / 2**30:.2f} GiB free; checkpoints and the export "
                          f"need about {need_bytes / 2**30:.2f} GiB (lower train.save_total_limit or free space)")


def train(cfg: Config) -> Path:
    """Run a whole recipe; return the exported model folder `OUTPUT/final`."""
    t = cfg.train
    out = Path(t.output_dir)
    accelerator = make_accelerator(t.mixed_precision)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size: {t.batch_size} is not divisible by the {world} processes")
    set_seed(t.seed)
    model = build_model(cfg)
    if main:
        # a checkpoint holds the weights and AdamW's two moments; keep_last + best + the final export
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        check_output_dir(out, weight_bytes * (3 * (t.save_total_limit + 1) + 1))
        save_config(cfg, out / "config.yaml")
    datasets, data_report = prepare_data(cfg, model, out, accelerator)  # mining, eval-overlap and duplicate checks
    if main:
        report_truncation(model, datasets)
    plan = BatchPlan(datasets, t.batch_size, t.seed, cfg.data.mixing)
    loss_fn = build_loss(cfg).to(accelerator.device)
    optimizer = build_optimizer(model, loss_fn, cfg)
    total_steps = t.max_steps or t.epochs * (len(plan) // t.grad_accum)
    warmup = math.ceil(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, t.scheduler))

    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "evals": []}
    if t.resume and (found := complete_checkpoints(out)):
        state, rng_states = load_checkpoint(found[-1], model, optimizer, scheduler, loss_fn)
        torch.set_rng_state(rng_states[accelerator.process_index]["cpu"])
        if torch.cuda.is_available() and rng_states[accelerator.process_index].get("cuda") is not None:
            torch.cuda.set_rng_state(rng_states[accelerator.process_index]["cuda"])
        if main:
            log.info("resumed from %s (step %d)", found[-1], state["step"])
            drop_metrics_after(out / "metrics.jsonl", state["step"])
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    evaluator = build_evaluator(cfg, out) if main else None
    metrics_file = out / "metrics.jsonl"
    if main and state["step"] == 0 and evaluator is not None:
        state["base"] = evaluator(model, "base")
        write_metrics(metrics_file, {"step": 0, "eval": state["base"]})
    tracker = start_wandb(cfg, out, resume=state["step"] > 0) if main and cfg.log.wandb else None

    def next_batch():
        batches = plan.epoch(state["epoch"])
        if state["batch"] >= len(batches):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
            batches = plan.epoch(state["epoch"])
        batch = batches[state["batch"]]
        state["batch"] += 1
        ds = datasets[batch.dataset]
        rows = batch.shard(accelerator.process_index, world)
        texts = {"anchor": [ds.anchor[i] for i in rows], "positive": [ds.positive[i] for i in rows]}
        if ds.negatives[rows[0]]:
            texts["negative"] = [n for i in rows for n in ds.negatives[i]]
        return texts

    step = TrainStep(cfg, accelerator, model, wrapped, loss_fn, optimizer, scheduler)
    progress = tqdm(total=total_steps, initial=state["step"], disable=not main, desc="train")
    wrapped.train()
    window_start, window_pairs = time.perf_counter(), 0
    while state["step"] < total_steps:
        batches = [next_batch() for _ in range(t.grad_accum)]
        loss = step(batches, state["step"] + 1)
        window_pairs += sum(len(texts["anchor"]) for texts in batches) * world
        state["step"] += 1
        # ---- bookkeeping: log, evaluate, checkpoint ------------------------------------------------------
        progress.update(1)
        elapsed = time.perf_counter() - window_start
        record = {"step": state["step"], "epoch": state["epoch"], "loss": loss,
                  "lr": scheduler.get_last_lr()[0], "pairs_per_s": window_pairs / max(elapsed, 1e-9)}
        if cfg.loss.learnable_temperature:
            record["temperature"] = float(getattr(loss_fn, "inner", loss_fn).temperature)
        progress.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{record['pairs_per_s']:.1f}")
        window_start, window_pairs = time.perf_counter(), 0
        if main:
            write_metrics(metrics_file, record)
            if tracker:
                tracker.log(record, step=state["step"])
        last, improved = state["step"] == total_steps, False
        evaluate_now = cfg.eval.data is not None and (last or (t.eval_steps and state["step"] % t.eval_steps == 0))
        if evaluate_now and main:
            rows = evaluator(model, f"step-{state['step']}")
            score = headline(rows, cfg.eval.metric)
            state["evals"].append({"step": state["step"], cfg.eval.metric: score})
            improved = state["best"] is None or score > state["best"]["score"]
            if improved:
                state["best"] = {"step": state["step"], "score": score}
            state["last_rows"] = rows
            write_metrics(metrics_file, {"step": state["step"], "eval": rows})
            if tracker:
                tracker.log({f"eval/{cfg.eval.metric}": score}, step=state["step"])
        if evaluate_now and world > 1:  # every process must agree on saving: it gathers their RNG states
            improved = broadcast_object_list([improved])[0]
        if last or (t.save_steps and (state["step"] % t.save_steps == 0 or improved)):
            checkpoint(accelerator, out, model, optimizer, scheduler, loss_fn, state, t.save_total_limit)
    progress.close()
    accelerator.wait_for_everyone()

    final = out / "final"
    if main:
        if evaluator is not None and "last_rows" not in state:  # resumed after the last checkpoint
            state["last_rows"] = evaluator(model, f"step-{state['step']}")
        rows = []
        if evaluator is not None:
            final_rows = [dict(r, model="final") for r in state.get("last_rows", [])]
            rows = state.get("base", []) + final_rows + (evaluator.bm25_rows() if cfg.eval.bm25 else [])
        model.save_pretrained(final, info=run_info(cfg, datasets, state, rows, data_report))
        if evaluator is not None:
            from train.report import write_report

            write_report(rows, out / "eval", info={**evaluator.describe(), "config": cfg.to_dict(), **data_report})
        if tracker:
            tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


class TrainStep:
    """One optimizer step, read top to bottom in `__call__`.

    Each batch's texts are sorted by token length within each role, so that its chunks (groups of
    `LENGTH_GROUP` texts, or the cached mode's mini-batches) pad little; the loss sees the embeddings back
    in batch order, so the in-batch negatives are exactly the sampled ones.
    """

    LENGTH_GROUP = 8

    def __init__(self, cfg: Config, accelerator: Accelerator, model: BiEncoder, wrapped: torch.nn.Module,
                 loss_fn: torch.nn.Module, optimizer, scheduler):
        self.cfg, self.accelerator, self.model, self.wrapped = cfg, accelerator, model, wrapped
        self.loss_fn, self.optimizer, self.scheduler = loss_fn, optimizer, scheduler

    def __call__(self, batches: list[dict[str, list[str]]], number: int) -> float:
        """Forward + loss + backward of each batch (gradients accumulate), then clip and update.

        `batches` holds `train.grad_accum` batches mapping roles to this process's texts; `number` is the
        step's 1-based index (for the error message). Returns the loss averaged over batches and processes.
        """
        cfg, accelerator = self.cfg, self.accelerator
        losses = []
        for micro, texts in enumerate(batches):
            keys = {role: text_keys(v).to(accelerator.device) for role, v in texts.items() if role != "anchor"} \
                if cfg.loss.mask_false_negatives else None
            order = {role: torch.tensor(self.model.length_order(v, KIND[role])) for role, v in texts.items()}
            by_length = {role: [v[i] for i in order[role]] for role, v in texts.items()}

            def loss_in_batch_order(embeddings: dict[str, torch.Tensor], keys) -> torch.Tensor:
                restored = {role: torch.empty_like(e).index_copy(0, order[role].to(e.device), e)
                            for role, e in embeddings.items()}
                return self.loss_fn(restored, keys)

            sync = nullcontext() if micro == len(batches) - 1 else accelerator.no_sync(self.wrapped)
            with sync:
                if cfg.loss.mini_batch_size:
                    loss = cached_backward(self.embed, by_length, loss_in_batch_order, cfg.loss.mini_batch_size,
                                           keys=keys, scale=1 / len(batches), backward=accelerator.backward,
                                           no_sync=lambda: accelerator.no_sync(self.wrapped))
                else:
                    loss = uncached_backward(self.embed_in_groups, by_length, loss_in_batch_order, keys=keys,
                                             scale=1 / len(batches), backward=accelerator.backward)
            losses.append(loss)
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {number}; stopping. The last good checkpoint is kept in "
                                f"{Path(cfg.train.output_dir) / 'checkpoints'}; lower train.lr or check the data")
        if cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(self.wrapped.parameters(), cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def embed(self, texts: list[str], role: str) -> torch.Tensor:
        """One padded forward of `texts` through the (possibly DDP-wrapped) model."""
        features = self.model.tokenize(texts, KIND[role])
        return self.wrapped(**{k: v.to(self.accelerator.device) for k, v in features.items()})

    def embed_in_groups(self, texts: list[str], role: str) -> torch.Tensor:
        """`embed` over consecutive groups of `LENGTH_GROUP` length-sorted texts, each padded to its own longest."""
        g = self.LENGTH_GROUP
        return torch.cat([self.embed(texts[i:i + g], role) for i in range(0, len(texts), g)])


def headline(rows: list[dict], metric: str) -> float:
    """The metric at the largest dim in float32: the number that picks the best checkpoint."""
    full = [r for r in rows if r["precision"] == "float32"] or rows
    return max(full, key=lambda r: r["dim"])[metric]


def checkpoint(accelerator, out, model, optimizer, scheduler, loss_fn, state, keep_last) -> None:
    """Save on the main process with every process's RNG state; keep the last K and the best."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rng_states = gather_object([rng]) if accelerator.num_processes > 1 else [rng]
    if accelerator.is_main_process:
        saved = {k: v for k, v in state.items() if k != "last_rows"}
        save_checkpoint(out, state["step"], model, optimizer, scheduler, loss_fn, rng_states, saved)
        best = out / "checkpoints" / f"step-{state['best']['step']}" if state.get("best") else None
        prune_checkpoints(out, keep_last, keep=best)
    accelerator.wait_for_everyone()


def build_evaluator(cfg: Config, out: Path):
    if cfg.eval.data is None:
        return None
    from train.beir import load_beir
    from train.bm25 import settings_from
    from train.evaluate import RetrievalEvaluator

    e = cfg.eval
    data = load_beir(e.data, e.split, ignore_identical_ids=e.ignore_identical_ids)
    dims = e.dims or cfg.loss.matryoshka_dims or None
    bm25 = settings_from(e.bm25_preset, k1=e.bm25_k1, b=e.bm25_b, stemmer=e.bm25_stemmer,
                         split_identifiers=e.bm25_split_identifiers)
    return RetrievalEvaluator(data, dims=dims, precisions=e.precisions, batch_size=e.batch_size, sts=e.sts,
                              out_dir=out / "eval", show_progress_bar=True, bm25=bm25)


def run_info(cfg: Config, datasets, state: dict, rows: list[dict], data_report: dict) -> dict:
    """What twinfold.json (and the model card) records about training: recipe, data, checks and eval results."""
    t = cfg.train
    info = {"training": {"base_model": cfg.model.name_or_path, "steps": state["step"],
                         "data": [{"name": d.name, "pairs": len(d), "negatives_per_pair": len(d.negatives[0])}
                                  for d in datasets],
                         "batch_size": t.batch_size, "lr": t.lr, "epochs": t.epochs, "max_steps": t.max_steps,
                         "warmup_ratio": t.warmup_ratio, "seed": t.seed, "loss": cfg.to_dict()["loss"],
                         **data_report}}
    if rows:
        info["eval"] = {"data": cfg.eval.data, "split": cfg.eval.split, "results": [
            {k: r[k] for k in EVAL_KEYS if k in r} for r in rows]}
    return info


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget the records of steps that a resumed run will do again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def write_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def start_wandb(cfg: Config, out: Path, resume: bool):
    import wandb

    mode = cfg.log.wandb_mode or os.environ.get("WANDB_MODE")
    return wandb.init(project=cfg.log.wandb_project, name=cfg.log.run_name, config=cfg.to_dict(), dir=str(out),
                      mode=mode, resume="allow" if resume else None)
