"""Encoding throughput of twinfold (PyTorch float32, bf16 and int8; ONNX Runtime float32 and int8) and
sentence-transformers on the same documents.

    python scripts/bench_encode.py [--docs 1024] [--batch-size 32] [--rounds 2] [--max-length 256]
        [--device cpu|cuda] [--model PATH]

Every side embeds the same seeded sample of SciFact corpus documents (title + text, as BEIR builds them)
with the same model (all-MiniLM-L6-v2 unless `--model`) at max_length 256 and the same batch size:
sentence-transformers with `SentenceTransformer.encode` (on a GPU also with its weights in bf16); twinfold with
`BiEncoder.encode` as its CLIs run it (`models.runtime` allocator setting on), in float32, with `compute="int8"`,
`"onnx"` and `"onnx-int8"` on the CPU (ONNX Runtime on the files of `models.export --onnx-int8`, exported once
before the rounds), and with `compute="bf16"` on a GPU or a CPU with bf16 units. Each round runs each side in a fresh
process (the order rotates): load, warm up on 64 other documents, time the encoding (waiting for the device at
the end). The table gives the median docs/s, peak memory (GPU: allocated; CPU: RSS), the ratio to
sentence-transformers (float32), the share of the machine's matmul rate (fp32; bf16 for bf16 sides) that the
unpadded tokens' FLOPs reach, and how far each side's embeddings are from sentence-transformers' float32 ones
(max |difference|, and the lowest cosine). The nDCG@10 cost of int8 or bf16 compute is measured with
`python -m twinfold.train.evaluate --compute`.
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DATA,
    encoder_flops,
    machine,
    matmul_rate,
    median,
    peak_memory,
    rate_cells,
    run_child,
    synchronize,
)

ALL_SIDES = ("sentence-transformers", "sentence-transformers bf16", "twinfold", "twinfold int8", "twinfold onnx",
             "twinfold onnx-int8", "twinfold bf16")
EXACT_SIDES = ("twinfold", "twinfold onnx")  # float32 sides: within 1e-4 of sentence-transformers


def sides(device: str) -> tuple[str, ...]:
    """What runs on this device: int8 and ONNX Runtime compute on CPUs, bf16 on GPUs and CPUs with bf16 units."""
    from twinfold.models.runtime import cpu_has_bf16

    if device == "cuda":
        return "sentence-transformers", "sentence-transformers bf16", "twinfold", "twinfold bf16"
    return ("sentence-transformers", "twinfold", "twinfold int8", "twinfold onnx", "twinfold onnx-int8") + (
        ("twinfold bf16",) if cpu_has_bf16() else ())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DATA / "scifact" / "corpus.jsonl")
    parser.add_argument("--docs", type=int, default=1024, help="documents timed per side and round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model folder or name")
    parser.add_argument("--child", choices=ALL_SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sample(args) -> tuple[list[str], list[str]]:
    """(warm-up documents, timed documents): a seeded sample of the corpus."""
    rows = [json.loads(line) for line in args.corpus.read_text().splitlines() if line.strip()]
    texts = [(r.get("title", "") + " " + r["text"]).strip() for r in rows]
    chosen = random.Random(0).sample(texts, min(len(texts), args.docs + 64))
    return chosen[:64], chosen[64:]


def child(args) -> dict:
    import torch

    from twinfold.models import resolve_model_path

    warmup, docs = sample(args)
    if args.child.startswith("sentence-transformers"):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(resolve_model_path(args.model)), device=args.device)
        model.max_seq_length = args.max_length
        if args.child.endswith("bf16"):
            model.to(torch.bfloat16)

        def encode(texts):
            return model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    else:
        from twinfold.models import BiEncoder
        from twinfold.models.runtime import keep_freed_memory

        keep_freed_memory()
        model = BiEncoder.from_pretrained(args.model, max_length=args.max_length).to(args.device)
        compute = args.child.split()[-1] if " " in args.child else "float32"

        def encode(texts):
            return model.encode(texts, args.batch_size, kind="document", compute=compute)
    encode(warmup)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(args.device)
    start = time.perf_counter()
    emb = encode(docs)
    synchronize(args.device)
    seconds = time.perf_counter() - start
    np.save(args.out, np.asarray(emb, dtype=np.float32))
    return {"seconds": seconds, "peak": peak_memory(args.device)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    _, docs = sample(args)
    flops, lengths = encoder_flops(docs, args.max_length, training=False, model=args.model)
    order = sides(args.device)
    dtypes = ("float32", "bfloat16") if any(side.endswith("bf16") for side in order) else ("float32",)
    rates = {dtype: matmul_rate(args.device, dtype) for dtype in dtypes}  # measured again at the end
    print(f"machine: {machine()}; measured matmul rate (TFLOP/s) "
          f"{', '.join(f'{d} {r / 1e12:.3f}' for d, r in rates.items())}\n"
          f"{args.model}, {args.device}, max_length {args.max_length}, batch {args.batch_size}, {len(docs)} SciFact "
          f"documents (mean {np.mean(lengths):.0f} tokens) x {args.rounds} rounds per side", flush=True)

    runs, embeddings = {side: [] for side in order}, {}
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "exported"  # the model with its onnx/ files, for the ONNX Runtime sides
        if any(side.startswith("twinfold onnx") for side in order):
            from twinfold.models import BiEncoder

            BiEncoder.from_pretrained(args.model, max_length=args.max_length).save_pretrained(exported, onnx_int8=True)
        for r in range(args.rounds):
            for i in range(len(order)):
                side = order[(i + r) % len(order)]
                out = Path(tmp) / f"{side.replace(' ', '-')}.npy"
                result = run_child(__file__, ["--child", side, "--out", str(out), "--corpus", str(args.corpus),
                                              "--docs", str(args.docs), "--batch-size", str(args.batch_size),
                                              "--max-length", str(args.max_length), "--device", args.device,
                                              "--model", str(exported) if "onnx" in side else args.model])
                runs[side].append(result)
                embeddings[side] = np.load(out)
                print(f"  round {r + 1} {side}: {len(docs) / result['seconds']:.2f} docs/s", flush=True)

    rates = {dtype: max(rate, matmul_rate(args.device, dtype)) for dtype, rate in rates.items()}
    print(f"matmul rate (TFLOP/s, best of the start and the end): "
          f"{', '.join(f'{d} {r / 1e12:.3f}' for d, r in rates.items())}")
    reference = embeddings[order[0]]
    speed = median([len(docs) / r["seconds"] for r in runs[order[0]]])
    memory = "peak GPU memory (GB)" if args.device == "cuda" else "peak RSS (GB)"
    print(f"\n| | docs/s (median) | range | {memory} | vs sentence-transformers | share of matmul rate "
          "| max abs diff to ST | lowest cosine to ST |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, rs in runs.items():
        rate = rates["bfloat16" if side.endswith("bf16") else "float32"]
        cells = rate_cells(len(docs), [r["seconds"] for r in rs], [r["peak"] for r in rs], flops, rate, speed)
        cosine = np.sum(embeddings[side] * reference, axis=1) / (
            np.linalg.norm(embeddings[side], axis=1) * np.linalg.norm(reference, axis=1))
        print(f"| {side} | {cells} | {np.abs(embeddings[side] - reference).max():.1e} | {cosine.min():.4f} |")
    failed = 0
    for side in (s for s in EXACT_SIDES if s in order):
        gap = np.abs(embeddings[side] - reference).max()
        if gap > 1e-4:
            print(f"FAILED: {side}'s float32 embeddings differ from sentence-transformers' by {gap:.1e} (> 1e-4)")
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
