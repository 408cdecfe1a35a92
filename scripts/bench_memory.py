"""Peak memory and time of one training step (forward + Matryoshka(InfoNCE) + backward), cached and uncached.

    python scripts/bench_memory.py [--batches 32,128,512] [--max-length 256] [--mini-batch-size 32]

Every configuration runs in a fresh subprocess that loads the model, warms up on 2 pairs, then times one
step on `batch` real pairs from scifact-train-pairs and reports its peak memory: peak RSS on CPU
(`resource.getrusage`), `torch.cuda.max_memory_allocated` on a GPU. Before running a configuration, its peak
is extrapolated linearly from the smaller batches already measured in the same mode; one that would not fit
in the available memory (minus `--margin-gb`) is reported as "would not fit (est. X GB)" and not run.
Prints a markdown table.

    python scripts/bench_memory.py --lora [--dtype bfloat16] [--model PATH | --random-qwen3] [--batches 8]

compares full fine-tuning (float32 weights) with a LoRA adapter (r 16 on the family's attention projections, see
models.lora; the base weights cast to `--dtype`) at each batch, uncached, each step with its AdamW update. Peak
memory is then the step's own peak: the RSS high-water mark is reset after loading and the warm-up step (on a
GPU, the peak allocation is reset). The table adds the trained parameters' share and the size of a training
checkpoint (train.checkpoint). `--random-qwen3` builds (once, in the temporary folder) a random Qwen3 decoder of
128M parameters (hidden 768, 12 layers, vocab 32000) with all-MiniLM-L6-v2's tokenizer, and measures it.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DATA, GB, current_rss, peak_rss, peak_rss_since_reset, reset_peak_rss, run_child  # noqa: E402

MATRYOSHKA_DIMS = [384, 256, 128, 64]
LORA_RANK = 16
TRAININGS = ("full", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    default_pairs = DATA / "scifact-train-pairs" / "train.jsonl"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--pairs", type=Path, default=default_pairs, help="JSONL with anchor/positive fields")
    parser.add_argument("--batches", default="32,128,512", help="comma-separated batch sizes (pairs)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--mini-batch-size", type=int, default=32, help="chunk size of the cached mode")
    parser.add_argument("--margin-gb", type=float, default=2.0, help="memory kept free when deciding what fits")
    parser.add_argument("--lora", action="store_true",
                        help=f"compare full fine-tuning with LoRA r {LORA_RANK} (uncached, with the AdamW update)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--lora: the base weights' dtype under the adapter (full fine-tuning stays float32)")
    parser.add_argument("--random-qwen3", action="store_true",
                        help="measure a random 128M-parameter Qwen3 decoder (hidden 768, 12 layers, vocab 32000)")
    parser.add_argument("--child", nargs=2, type=int, metavar=("BATCH", "MINI"), help=argparse.SUPPRESS)
    parser.add_argument("--child-training", choices=TRAININGS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def random_qwen3() -> Path:
    """A random Qwen3 decoder (hidden 768, 12 layers of 12 heads, 4 key/value heads, vocab 32000: 128M
    parameters) with all-MiniLM-L6-v2's tokenizer, built once into the temporary folder."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    from twinfold.models.resolve import resolve_model_path

    folder = Path(tempfile.gettempdir()) / "twinfold-random-qwen3"
    if not (folder / "model.safetensors").exists():
        config = Qwen3Config(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             num_key_value_heads=4, head_dim=64, intermediate_size=3072, max_position_embeddings=512)
        torch.manual_seed(0)
        Qwen3Model(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")).save_pretrained(folder)
    return folder


# --- child: one configuration -------------------------------------------------------------------------
def measure(args: argparse.Namespace, batch: int, mini_batch_size: int) -> dict:
    """Run one step in this process; mini_batch_size 0 means uncached. Memory in bytes."""
    import torch

    from twinfold.losses import InfoNCE, Matryoshka, cached_backward, chunked, uncached_backward
    from twinfold.models import BiEncoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BiEncoder.from_pretrained(args.model, max_length=args.max_length)
    training = args.child_training
    if training == "lora":
        from twinfold.models.lora import LoraSettings, add_lora

        model.encoder = add_lora(model.encoder.to(getattr(torch, args.dtype)), LoraSettings(r=LORA_RANK), args.model)
    model = model.to(device).train()
    loss_fn = Matryoshka(InfoNCE(), [d for d in MATRYOSHKA_DIMS if d <= model.dim])
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=True) if training else None
    kinds = {"anchor": "query", "positive": "document"}

    def embed(texts, role):
        return model.embed(texts, kinds[role])

    with open(args.pairs) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(batch))]
    if len(rows) < batch:
        raise SystemExit(f"{args.pairs} has {len(rows)} pairs; batch {batch} needs more")
    texts = {"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]}

    def step(texts):
        model.zero_grad(set_to_none=True)
        if mini_batch_size:
            loss = cached_backward(embed, chunked(texts, mini_batch_size), loss_fn)
        else:
            loss = uncached_backward(embed, chunked(texts), loss_fn)
        if optimizer is not None:
            optimizer.step()
        return loss

    step({role: t[:2] for role, t in texts.items()})  # warm-up: one-off allocations, lazy initialisation, AdamW state
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if training:
            reset_peak_rss()
        before = current_rss()
    start = time.perf_counter()
    loss = step(texts).item()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_since_reset() if training else peak_rss()
    result = {"seconds": time.perf_counter() - start, "before": before, "peak": peak, "loss": loss}
    if training:
        total = sum(p.numel() for p in model.parameters())
        result.update(trained=sum(p.numel() for p in trained), total=total,
                      checkpoint_bytes=checkpoint_size(model, optimizer, loss_fn))
    return result


def checkpoint_size(model, optimizer, loss_fn) -> int:
    """Bytes of the training checkpoint (train.checkpoint) of this model and optimizer."""
    import tempfile

    import torch

    from twinfold.train.checkpoint import save_checkpoint

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with tempfile.TemporaryDirectory() as out:
        folder = save_checkpoint(out, 1, model, optimizer, scheduler, loss_fn, [torch.get_rng_state()], {}, {})
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# --- parent: the table ----------------------------------------------------------------------------------
def available_memory(gpu: bool) -> int:
    """Bytes the benchmark may use: free GPU memory on a GPU machine, else MemAvailable."""
    import torch

    if gpu:
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def estimate(measured: list[tuple[int, dict]], batch: int) -> float | None:
    """Peak at `batch` on the line through the two largest measured batches (or through the first one and
    the memory in use before its step)."""
    if not measured:
        return None
    if len(measured) == 1:
        (b1, r1), = measured
        points = [(0, r1["before"]), (b1, r1["peak"])]
    else:
        points = [(b, r["peak"]) for b, r in measured[-2:]]
    (x0, y0), (x1, y1) = points
    return y1 + (y1 - y0) / (x1 - x0) * (batch - x1)


def run_config(args: argparse.Namespace, batch: int, mini_batch_size: int, training: str | None = None) -> dict | str:
    """One configuration in a child process: its result, or "failed: <last error line>"."""
    extra = ["--child-training", training, "--dtype", args.dtype] if training else []
    try:
        return run_child(__file__, ["--child", str(batch), str(mini_batch_size), "--model", args.model,
                                    "--pairs", str(args.pairs), "--max-length", str(args.max_length), *extra])
    except RuntimeError as e:
        return f"failed: {str(e).strip().splitlines()[-1]}"


def compare_lora(args: argparse.Namespace, batches: list[int]) -> None:
    """The table of full fine-tuning (float32) against LoRA (weights in `args.dtype`) at each batch."""
    print("| training | weights | batch | peak memory (GB) | step's own memory (GB) | time (s) | trained parameters "
          "| checkpoint (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for batch in batches:
        for training, dtype in (("full", "float32"), ("lora", args.dtype)):
            result = run_config(args, batch, 0, training)
            name = "full fine-tuning" if training == "full" else f"LoRA r {LORA_RANK}"
            if isinstance(result, str):
                print(f"| {name} | {dtype} | {batch} | {result} | | | | |", flush=True)
                continue
            share = result["trained"] / result["total"]
            print(f"| {name} | {dtype} | {batch} | {result['peak'] / GB:.2f} | "
                  f"{(result['peak'] - result['before']) / GB:.2f} | {result['seconds']:.1f} | "
                  f"{result['trained'] / 1e6:.2f}M of {result['total'] / 1e6:.1f}M ({share:.2%}) | "
                  f"{result['checkpoint_bytes'] / 2**20:.1f} |", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args, *args.child)))
        return
    import torch

    if args.random_qwen3:
        args.model = str(random_qwen3())
    gpu = torch.cuda.is_available()
    batches = sorted(int(b) for b in args.batches.split(","))
    budget = available_memory(gpu) - args.margin_gb * GB
    print(f"model {args.model}, max_length {args.max_length}, cached mini-batch {args.mini_batch_size}, "
          f"Matryoshka dims {MATRYOSHKA_DIMS}\n"
          f"device {'cuda' if gpu else 'cpu'}; peak memory = {'max_memory_allocated' if gpu else 'peak RSS'}"
          f"{' of the step' if args.lora else ''}; "
          f"memory budget {budget / GB:.1f} GB\n")
    if args.lora:
        compare_lora(args, batches)
        return
    print("| mode | batch | peak memory (GB) | step's own memory (GB) | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for mode, mini in (("uncached", 0), ("cached", args.mini_batch_size)):
        measured = []
        for batch in batches:
            expected = estimate(measured, batch)
            if expected is not None and expected > budget:
                print(f"| {mode} | {batch} | would not fit (est. {expected / GB:.1f} GB) | | |", flush=True)
                continue
            result = run_config(args, batch, mini)
            if isinstance(result, str):
                print(f"| {mode} | {batch} | {result} | | |", flush=True)
                continue
            measured.append((batch, result))
            print(f"| {mode} | {batch} | {result['peak'] / GB:.2f} | {(result['peak'] - result['before']) / GB:.2f} "
                  f"| {result['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
