"""Training throughput of twinfold and sentence-transformers on the same model, data, batch, max_length and loss.

    python scripts/bench_train.py [--batch-size 32] [--mini-batch-size N] [--steps 3] [--rounds 3]
        [--device cpu|cuda] [--model PATH] [--mixed-precision no|bf16] [--lora R] [--dtype float32|bfloat16]
        [--quantization binary|int8|alignment|binary,alignment|...] [--unpad]

Both sides fine-tune the same model (all-MiniLM-L6-v2 unless `--model` names a folder, e.g. a BERT-base-size
one; max_length 256) on the same SciFact train batches with in-batch InfoNCE at temperature 0.05
(sentence-transformers: MultipleNegativesRankingLoss, scale 20; with --mini-batch-size its Cached variant)
inside Matryoshka over 384/256/128/64 (dims above the model's width left out) with weights 1, fused AdamW
(lr 3e-5, weight decay 0.01 except biases and norms), gradient clipping at 1.0; in fp32, or under bf16 autocast
with `--mixed-precision bf16` (the default on a GPU). twinfold runs `train.loop.TrainStep` as built from
`configs/scifact.yaml`, fed as the trainer feeds it: each batch's texts tokenized once beforehand (the trainer's
token cache, not timed), then assembled (length-sorted chunks by the device's token budget, padded) by a
`DataLoader` with the device's loader settings (worker processes and pinned memory on a GPU), with its
false-negative masking off (MultipleNegativesRankingLoss has none, and these batches may repeat a document).
sentence-transformers runs what its trainer's step does (its data collator tokenizing in the main process, the
loss, backward, clip, optimizer step) without the Trainer's own overhead. Neither side waits for the device
inside its timed steps; the timer waits once after them.

Each round runs each side in a fresh process (the order alternates): load the model; **check**: with dropout
off, the losses of an update on batch A and then of one on batch B (after A's update) must agree (1e-5 in fp32,
3e-2 under bf16); warm up one step; then time `--steps` steps in training mode. The table gives the median
pairs/s over rounds, ms per step, peak memory (GPU: allocated; CPU: RSS), the ratio to sentence-transformers and
the share of the machine's matmul rate (bf16 under bf16, else fp32) that the step's useful FLOPs reach
(`benchlib.encoder_flops` of the unpadded tokens), and on the CPU the system-time share.

`--lora R` trains a LoRA adapter of rank R (alpha 2R) on both sides, on the layers twinfold picks for the family
(`models.lora.target_layers`); sentence-transformers gets the same adapter from peft, both from
the same seed, so the check still compares one computation (sentence-transformers' own `add_adapter` needs peft
>= 0.22, newer than PyPI's 0.21.2 on 2026-12-07: its Transformer module is wrapped with peft's `get_peft_model`,
which is what `add_adapter` does). `--dtype bfloat16` loads the weights in bf16 on both
sides (twinfold's `model.dtype`, sentence-transformers' `model_kwargs`).

`--quantization binary` (or `int8`, `alignment`, several comma-separated) adds a third side: twinfold with those
quantization-aware terms at weight 1 (`loss.quantization`), timed in the same rounds; its loss is not part of the
check (the terms add to it), and its ratio to plain twinfold is what the terms cost.

`--unpad` adds twinfold unpadded (`model.unpad: true`, `models.unpad`: each chunk's texts in one row without
padding, the token budget counting real tokens) and, on a GPU with flash-attn, sentence-transformers loaded with
`attn_implementation="flash_attention_2"` (its `unpad_inputs` path); both are part of the loss check.
"""
import argparse
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DATA,
    REPO,
    cpu_seconds,
    current_rss,
    encoder_flops,
    machine,
    matmul_rate,
    median,
    peak_memory,
    rate_cells,
    run_child,
    synchronize,
)

DIMS = [384, 256, 128, 64]
TEMPERATURE, LR, WEIGHT_DECAY, MAX_GRAD_NORM = 0.05, 3e-5, 0.01, 1.0
SIDES = ("sentence-transformers", "twinfold")
QUANTIZED = "twinfold + quantization terms"
UNPADDED = ("twinfold, unpadded", "sentence-transformers, flash_attention_2")  # --unpad; the second with flash-attn


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=DATA / "scifact-train-pairs" / "train.jsonl",
                        help="JSONL with anchor and positive fields")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=0, help="cached (GradCache) mode with this chunk")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model folder or name")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), help="default: bf16 on cuda, no on cpu")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="train a LoRA adapter of rank R (alpha 2R)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the weights' dtype")
    parser.add_argument("--chunk-tokens", type=int, help="twinfold's train.chunk_tokens (default: the device's)")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of one more step per side here")
    parser.add_argument("--quantization", help="also time twinfold with these terms at weight 1: binary, int8, "
                        "alignment, comma-separated")
    parser.add_argument("--unpad", action="store_true", help="also twinfold unpadded (model.unpad: true) and, where "
                        "flash-attn is installed, sentence-transformers with flash_attention_2")
    parser.add_argument("--child", choices=(*SIDES, QUANTIZED, *UNPADDED), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    return args


def model_dims(model: str) -> list[int]:
    """The Matryoshka dims of the benchmark that the model's width allows."""
    from transformers import AutoConfig

    from twinfold.models import resolve_model_path

    hidden = AutoConfig.from_pretrained(resolve_model_path(model)).hidden_size
    return [d for d in DIMS if d <= hidden]


def batch_stream(path: Path, sizes: list[int]) -> list[list[dict]]:
    """Consecutive batches of the given sizes from seeded shuffles of the pairs (reshuffled when used up)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng, pool, out = random.Random(0), [], []
    for size in sizes:
        batch = []
        while len(batch) < size:
            if not pool:
                pool = rng.sample(rows, len(rows))
            batch.append(pool.pop())
        out.append(batch)
    return out


def plan(args) -> dict[str, list[list[dict]]]:
    """Check batches A and B, the warm-up batch (at most 64 pairs each), the timed batches, the profiled one."""
    small = min(args.batch_size, 64)
    batches = batch_stream(args.pairs, [small] * 3 + [args.batch_size] * (args.steps + 1))
    return {"check": batches[:2], "warmup": batches[2:3], "timed": batches[3:-1], "profile": batches[-1:]}


# --- children: one side each ------------------------------------------------------------------------------
def twinfold_step(args):
    """`(model, step(batch number) -> loss tensor)` running twinfold's TrainStep as the trainer builds and feeds it."""
    import torch
    from torch.utils.data import DataLoader

    from twinfold.models.runtime import default_token_budget, loader_settings
    from twinfold.train.config import load_config
    from twinfold.train.data.batches import assemble
    from twinfold.train.data.pairs import KIND
    from twinfold.train.loop import TrainStep, build_loss, build_model, build_optimizer, make_accelerator

    overrides = [f"model.name_or_path={args.model}", f"model.max_length={args.max_length}",
                 f"train.batch_size={args.batch_size}", f"loss.mini_batch_size={args.mini_batch_size or 'null'}",
                 f"loss.temperature={TEMPERATURE}", f"loss.matryoshka_dims={model_dims(args.model)}",
                 f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}", f"train.max_grad_norm={MAX_GRAD_NORM}",
                 "loss.mask_false_negatives=false", "eval.data=null", f"model.dtype={args.dtype}",
                 f"train.output_dir={tempfile.mkdtemp(prefix='bench-train-')}"]
    if args.lora:
        overrides.append(f"model.lora={{r: {args.lora}, alpha: {2 * args.lora}}}")
    if args.child == UNPADDED[0]:
        overrides.append("model.unpad=true")
    if args.child == QUANTIZED:
        overrides.append(f"loss.quantization={{{', '.join(f'{q}: 1.0' for q in args.quantization.split(','))}}}")
    cfg = load_config(REPO / "configs" / "scifact.yaml", overrides)
    accelerator = make_accelerator(args.mixed_precision)
    torch.manual_seed(0)  # the adapter's initial weights: the same draw as sentence-transformers'
    model = build_model(cfg)
    loss_fn = build_loss(cfg).to(accelerator.device)
    optimizer = build_optimizer(model, loss_fn, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(cfg, accelerator, model, wrapped, loss_fn, optimizer, scheduler)
    batches = [b for group in plan(args).values() for b in group]
    tokens = [{role: (model.token_ids([r[role] for r in rows], KIND[role]), [0] * len(rows))
               for role in ("anchor", "positive")} for rows in batches]  # the token cache
    budget, padder = args.chunk_tokens or default_token_budget(accelerator.device), model.padder

    class Assembled(torch.utils.data.Dataset):
        def __getitem__(self, i):
            return assemble(tokens[i], padder, budget, cfg.loss.mini_batch_size)

    loader = iter(DataLoader(Assembled(), batch_size=None, sampler=range(len(batches)),
                             generator=torch.Generator(), **loader_settings(accelerator.device)))
    return wrapped, lambda: step([next(loader)])


def st_step(args):
    """`(model, step() -> loss tensor)` doing what SentenceTransformerTrainer's training step does."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    from twinfold.models import resolve_model_path

    flash = {"attn_implementation": "flash_attention_2"} if args.child == UNPADDED[1] else {}
    model = SentenceTransformer(str(resolve_model_path(args.model)), device=args.device,
                                model_kwargs={"dtype": getattr(torch, args.dtype), **flash})
    model.max_seq_length = args.max_length
    if args.lora:  # peft on its Transformer module (its add_adapter needs a newer peft than PyPI has)
        from peft import LoraConfig, get_peft_model

        from twinfold.models.lora import target_layers

        auto_model = model[0].auto_model
        torch.manual_seed(0)  # as twinfold's side
        model[0].auto_model = get_peft_model(auto_model, LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, bias="none",
            target_modules=target_layers(auto_model)))
    scale = 1 / TEMPERATURE
    inner = (CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=args.mini_batch_size)
             if args.mini_batch_size else MultipleNegativesRankingLoss(model, scale=scale))
    loss_fn = MatryoshkaLoss(model, inner, matryoshka_dims=model_dims(args.model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=LR, fused=True)
    collate = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)
    batches = iter([b for group in plan(args).values() for b in group])
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")

    def run():
        rows = next(batches)
        inputs = collate([{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
        features = [{k[len(p):]: v.to(args.device) if torch.is_tensor(v) else v for k, v in inputs.items()
                     if k.startswith(p)}
                    for p in ("anchor_", "positive_")]
        with autocast:  # the Trainer's bf16=True
            loss = loss_fn(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return model, run


def child(args) -> dict:
    import torch

    model, step = (st_step if args.child.startswith(SIDES[0]) else twinfold_step)(args)
    loaded_rss = current_rss()
    model.eval()  # the check: no dropout, so both sides compute the same function
    check = [float(step()) for _ in range(2)]  # B's loss is taken after the update on A
    model.train()
    float(step())  # warm-up
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    user0, sys0 = cpu_seconds()
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(args.device)
    seconds = time.perf_counter() - start
    user1, sys1 = cpu_seconds()
    if args.profile:
        profile_step(step, args)
    return {"check": check, "seconds": seconds, "peak": peak_memory(args.device), "loaded_rss": loaded_rss,
            "sys_share": (sys1 - sys0) / max(1e-9, (user1 - user0) + (sys1 - sys0)), "threads": torch.get_num_threads()}


def profile_step(step, args) -> None:
    """Append a torch.profiler table (operators by device time, or CPU time on the CPU) of one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(args.device)
    key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    with open(args.profile, "a") as f:
        f.write(f"## {args.child}, batch {args.batch_size}, {args.model}\n"
                f"{prof.key_averages().table(sort_by=key, row_limit=30)}\n")


# --- parent: alternate, then the table ----------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    texts = [r[role] for rows in plan(args)["timed"] for r in rows for role in ("anchor", "positive")]
    flops, _ = encoder_flops(texts, args.max_length, training=True, model=args.model)
    dtype = "bfloat16" if args.mixed_precision == "bf16" else "float32"
    rate = matmul_rate(args.device, dtype)  # measured again at the end: the higher one counts
    mode = f"cached, mini-batch {args.mini_batch_size}" if args.mini_batch_size else "uncached"
    print(f"machine: {machine()}; measured {dtype} matmul rate {rate / 1e12:.3f} TFLOP/s\n"
          f"{args.model}, {args.device}, mixed precision {args.mixed_precision}, max_length {args.max_length}, "
          f"batch {args.batch_size} ({mode}), Matryoshka {model_dims(args.model)}, weights {args.dtype}"
          f"{f', LoRA r {args.lora}' if args.lora else ''}"
          f"{f', quantization terms {args.quantization}' if args.quantization else ''}, "
          f"{args.steps} timed steps x {args.rounds} rounds per side", flush=True)

    flash = importlib.util.find_spec("flash_attn") is not None and args.device == "cuda"
    sides = (*SIDES, *((QUANTIZED,) if args.quantization else ()),
             *((UNPADDED if flash else UNPADDED[:1]) if args.unpad else ()))
    runs = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            flags = ["--child", side, "--pairs", str(args.pairs), "--batch-size", str(args.batch_size),
                     "--mini-batch-size", str(args.mini_batch_size), "--max-length", str(args.max_length),
                     "--steps", str(args.steps), "--rounds", "1", "--device", args.device, "--model", args.model,
                     "--mixed-precision", args.mixed_precision, "--lora", str(args.lora), "--dtype", args.dtype,
                     *(["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else []),
                     *(["--quantization", args.quantization] if args.quantization else []),
                     *(["--unpad"] if args.unpad else []),
                     *(["--profile", str(args.profile)] if args.profile else [])]
            result = run_child(__file__, flags)
            runs[side].append(result)
            print(f"  round {r + 1} {side}: {args.steps * args.batch_size / result['seconds']:.2f} pairs/s, "
                  f"{1000 * result['seconds'] / args.steps:.1f} ms/step", flush=True)

    rate = max(rate, matmul_rate(args.device, dtype))
    print(f"{dtype} matmul rate (best of the start and the end): {rate / 1e12:.3f} TFLOP/s")
    checked = [side for side in sides if side != QUANTIZED]  # every side but the terms' computes the same loss
    diff = max(abs(a - b) for side in checked[1:] for run_st, run_side in zip(runs[SIDES[0]], runs[side])
               for a, b in zip(run_st["check"], run_side["check"]))
    print(f"\nloss check (dropout off; update on A, then on B): "
          f"{'; '.join(side + ' ' + ', '.join(f'{x:.6f}' for x in runs[side][0]['check']) for side in checked)}; "
          f"largest difference {diff:.1e}")
    items = args.steps * args.batch_size
    reference = median([items / r["seconds"] for r in runs[SIDES[0]]])
    memory = "peak GPU memory (GB)" if args.device == "cuda" else "peak RSS (GB)"
    print(f"\n| | pairs/s (median) | range | {memory} | vs sentence-transformers | share of matmul rate "
          "| ms/step | system time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, rs in runs.items():
        seconds = [r["seconds"] for r in rs]
        cells = rate_cells(items, seconds, [r["peak"] for r in rs], flops, rate, reference)
        print(f"| {side} | {cells} | {1000 * median(seconds) / args.steps:.1f} "
              f"| {median([r['sys_share'] for r in rs]):.0%} |")
    if args.quantization:
        plain, terms = (median([r["seconds"] for r in runs[side]]) for side in (SIDES[1], QUANTIZED))
        print(f"\nquantization terms ({args.quantization}): {terms / plain:.3f}x the time of plain twinfold's step")
    tolerance = 3e-2 if args.mixed_precision == "bf16" else 1e-5
    if diff > tolerance:
        print(f"FAILED: the sides' losses differ by {diff:.1e} (> {tolerance:.0e})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
