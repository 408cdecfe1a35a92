"""Peak memory and time of one training step (forward + Matryoshka(InfoNCE) + backward), cached and uncached.

    python scripts/bench_memory.py [--batches 32,128,512] [--max-length 256] [--mini-batch-size 32]

Every configuration runs in a fresh subprocess that loads the model, warms up on 2 pairs, then times one
step on `batch` real pairs from scifact-train-pairs and reports its peak memory: peak RSS on CPU
(`resource.getrusage`), `torch.cuda.max_memory_allocated` on a GPU. Before running a configuration, its peak
is extrapolated linearly from the smaller batches already measured in the same mode; one that would not fit
in the available memory (minus `--margin-gb`) is reported as "would not fit (est. X GB)" and not run.
Prints a markdown table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import DATA, GB, current_rss, peak_rss, run_child  # noqa: E402

MATRYOSHKA_DIMS = [384, 256, 128, 64]


def parse_args(argv=None) -> argparse.Namespace:
    default_pairs = DATA / "scifact-train-pairs" / "train.jsonl"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--pairs", type=Path, default=default_pairs, help="JSONL with anchor/positive fields")
    parser.add_argument("--batches", default="32,128,512", help="comma-separated batch sizes (pairs)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--mini-batch-size", type=int, default=32, help="chunk size of the cached mode")
    parser.add_argument("--margin-gb", type=float, default=2.0, help="memory kept free when deciding what fits")
    parser.add_argument("--child", nargs=2, type=int, metavar=("BATCH", "MINI"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- child: one configuration -------------------------------------------------------------------------
def measure(args: argparse.Namespace, batch: int, mini_batch_size: int) -> dict:
    """Run one step in this process; mini_batch_size 0 means uncached. Memory in bytes."""
    import torch

    from twinfold.losses import InfoNCE, Matryoshka, cached_backward, chunked, uncached_backward
    from twinfold.models import BiEncoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BiEncoder.from_pretrained(args.model, max_length=args.max_length).to(device).train()
    loss_fn = Matryoshka(InfoNCE(), [d for d in MATRYOSHKA_DIMS if d <= model.dim])
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
            return cached_backward(embed, chunked(texts, mini_batch_size), loss_fn)
        return uncached_backward(embed, chunked(texts), loss_fn)

    step({role: t[:2] for role, t in texts.items()})  # warm-up: one-off allocations and lazy initialisation
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss()
    start = time.perf_counter()
    loss = step(texts).item()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss()
    return {"seconds": time.perf_counter() - start, "before": before, "peak": peak, "loss": loss}


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


def run_config(args: argparse.Namespace, batch: int, mini_batch_size: int) -> dict | str:
    """One configuration in a child process: its result, or "failed: <last error line>"."""
    try:
        return run_child(__file__, ["--child", str(batch), str(mini_batch_size), "--model", args.model,
                                    "--pairs", str(args.pairs), "--max-length", str(args.max_length)])
    except RuntimeError as e:
        return f"failed: {str(e).strip().splitlines()[-1]}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args, *args.child)))
        return
    import torch

    gpu = torch.cuda.is_available()
    batches = sorted(int(b) for b in args.batches.split(","))
    budget = available_memory(gpu) - args.margin_gb * GB
    print(f"model {args.model}, max_length {args.max_length}, cached mini-batch {args.mini_batch_size}, "
          f"Matryoshka dims {MATRYOSHKA_DIMS}\n"
          f"device {'cuda' if gpu else 'cpu'}; peak memory = {'max_memory_allocated' if gpu else 'peak RSS'}; "
          f"memory budget {budget / GB:.1f} GB\n")
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
