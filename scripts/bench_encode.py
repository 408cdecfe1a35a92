"""Encoding throughput of twinfold (PyTorch float32, bf16 and int8; ONNX Runtime float32 and int8) and
sentence-transformers on the same documents.

    python scripts/bench_encode.py [--docs 1024] [--batch-size 32] [--rounds 2] [--max-length 256]
        [--device cpu|cuda] [--model PATH] [--unpad]
    python scripts/bench_encode.py --scale [--scale-docs 100000,1000000] [--minilm-docs 100000]
        [--processes 1,2] [--threads-per-process N] [--max-length 32]

Every side embeds the same seeded sample of SciFact corpus documents (title + text, as BEIR builds them)
with the same model (all-MiniLM-L6-v2 unless `--model`) at max_length 256 and the same batch size:
sentence-transformers with `SentenceTransformer.encode` (on a GPU also with its weights in bf16); twinfold with
`BiEncoder.encode` as its CLIs run it (`models.runtime` allocator setting on), in float32, with `compute="int8"`,
`"onnx"` and `"onnx-int8"` on the CPU (ONNX Runtime on the files of `models.export --onnx-int8`, exported once
before the rounds), and with `compute="bf16"` on a GPU or a CPU with bf16 units; with `--unpad` also unpadded
(`models.unpad`: bf16 on a GPU, float32 on the CPU's reference kernel) and, on a GPU with flash-attn,
sentence-transformers with flash_attention_2 (its `unpad_inputs` path). Each round runs each side in a fresh
process (the order rotates): load, warm up on 64 other documents, time the encoding (waiting for the device at
the end). The table gives the median docs/s, peak memory (GPU: allocated; CPU: RSS), the ratio to
sentence-transformers (float32), the share of the machine's matmul rate (fp32; bf16 for bf16 sides) that the
unpadded tokens' FLOPs reach, and how far each side's embeddings are from sentence-transformers' float32 ones
(max |difference|, and the lowest cosine). The nDCG@10 cost of int8 or bf16 compute is measured with
`python -m twinfold.train.evaluate --compute`.

`--scale` measures `twinfold encode --format parquet --output DIR` end to end (a fresh process: start, load, read the
input as a stream, encode, write the parts and the manifest) on seeded synthetic documents of 8-60 words written to
a JSONL file, with a tiny random BERT (2 layers, hidden 128, MiniLM's tokenizer) and all-MiniLM-L6-v2 (up to
`--minilm-docs` documents), both at `--max-length` (32), in 1 and 2 processes (`accelerate launch`, each process
with its share of the cores, or `--threads-per-process` torch threads). Each row gives documents/s over the
command's wall time and the peak RSS of its largest process; for all-MiniLM-L6-v2, sentence-transformers' `encode`
on the same documents (read into memory first, as it needs them; alone and with its multi-process pool of one process
per core) in a fresh process too, and whether its vectors equal twinfold's (max |difference| <= 1e-5).
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DATA,
    GB,
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
             "twinfold onnx-int8", "twinfold bf16", "twinfold unpadded", "twinfold bf16 unpadded",
             "sentence-transformers bf16 flash")
EXACT_SIDES = ("twinfold", "twinfold onnx", "twinfold unpadded")  # float32 sides: within 1e-4 of sentence-transformers


def sides(device: str, unpad: bool = False) -> tuple[str, ...]:
    """What runs on this device: int8 and ONNX Runtime compute on CPUs, bf16 on GPUs and CPUs with bf16 units;
    with `unpad`, twinfold unpadded (bf16 on a GPU, where varlen kernels run half precision; float32 on the CPU's
    reference kernel) and, where flash-attn is installed, sentence-transformers with flash_attention_2 (its
    `unpad_inputs` path)."""
    import importlib.util

    from twinfold.models.runtime import cpu_has_bf16

    if device == "cuda":
        unpadded = ("twinfold bf16 unpadded",) + (
            ("sentence-transformers bf16 flash",) if importlib.util.find_spec("flash_attn") else ())
        return ("sentence-transformers", "sentence-transformers bf16", "twinfold", "twinfold bf16") + (
            unpadded if unpad else ())
    return ("sentence-transformers", "twinfold", "twinfold int8", "twinfold onnx", "twinfold onnx-int8") + (
        ("twinfold bf16",) if cpu_has_bf16() else ()) + (("twinfold unpadded",) if unpad else ())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DATA / "scifact" / "corpus.jsonl")
    parser.add_argument("--docs", type=int, default=1024, help="documents timed per side and round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, help="default: 256; with --scale, 32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model folder or name")
    parser.add_argument("--unpad", action="store_true", help="also the unpadded sides (models.unpad)")
    parser.add_argument("--scale", action="store_true", help="sharded encoding of synthetic documents at scale")
    parser.add_argument("--scale-docs", type=lambda v: [int(x) for x in v.split(",")], default=[100_000],
                        help="--scale: corpus sizes, e.g. 100000,1000000")
    parser.add_argument("--minilm-docs", type=int, default=100_000, help="--scale: largest corpus for all-MiniLM-L6-v2")
    parser.add_argument("--processes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    parser.add_argument("--threads-per-process", type=int,
                        help="--scale: torch threads of each twinfold process (default: its share of the cores)")
    parser.add_argument("--child", choices=ALL_SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--child-run", help=argparse.SUPPRESS)  # a JSON command: its wall time and peak RSS
    parser.add_argument("--child-st", nargs=3, help=argparse.SUPPRESS)  # model, documents, .npy out
    parser.add_argument("--child-st-pool", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.max_length = args.max_length or (32 if args.scale else 256)
    return args


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

        flash = {"attn_implementation": "flash_attention_2", "dtype": torch.bfloat16} if "flash" in args.child else {}
        model = SentenceTransformer(str(resolve_model_path(args.model)), device=args.device, model_kwargs=flash)
        model.max_seq_length = args.max_length
        if "bf16" in args.child:
            model.to(torch.bfloat16)

        def encode(texts):
            return model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
    else:
        from twinfold.models import BiEncoder
        from twinfold.models.runtime import keep_freed_memory

        keep_freed_memory()
        words = args.child.split()[1:]
        model = BiEncoder.from_pretrained(args.model, max_length=args.max_length, unpad="unpadded" in words)
        model = model.to(args.device)
        compute = next((w for w in words if w != "unpadded"), "float32")

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


# --- --scale ----------------------------------------------------------------------------------------------
SCALE_WORDS = ("cell gene protein membrane signal receptor kinase tumour immune response pathway enzyme binding "
               "expression mutation patient trial dose effect risk model data analysis network structure function "
               "water climate soil energy market policy court law language speech image video search index").split()


def write_documents(path: Path, count: int) -> None:
    """`count` seeded documents of 8-60 words, as JSONL with ids d0, d1, ..."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(count):
            words = " ".join(rng.choices(SCALE_WORDS, k=rng.randint(8, 60)))
            f.write(json.dumps({"_id": f"d{i}", "text": words}) + "\n")


def scale_models(folder: Path, max_length: int) -> dict[str, Path]:
    """The tiny random BERT and all-MiniLM-L6-v2, each saved with `max_length` (the encode CLI reads it there)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from twinfold.models import BiEncoder, resolve_model_path

    minilm = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=128)).save_pretrained(folder / "tiny-bert")
    tokenizer.save_pretrained(folder / "tiny-bert")
    models = {"tiny BERT": folder / "tiny", "all-MiniLM-L6-v2": folder / "minilm"}
    for source, out in ((folder / "tiny-bert", models["tiny BERT"]), (minilm, models["all-MiniLM-L6-v2"])):
        BiEncoder.from_pretrained(source, max_length=max_length).save_pretrained(out)
    return models


def timed(command: list[str]) -> dict:
    """Wall seconds and the peak RSS of the largest process of `command`, run from a fresh child."""
    return run_child(__file__, ["--child-run", json.dumps([str(c) for c in command])])


def run_timed(command: list[str]) -> dict:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def st_child(model: str, documents: str, out: str, pool: bool) -> dict:
    """sentence-transformers' encode of every document (read into memory first); vectors saved to `out`."""
    from sentence_transformers import SentenceTransformer

    texts = [json.loads(line)["text"] for line in open(documents)]
    st = SentenceTransformer(model, device="cpu")
    if pool:
        workers = st.start_multi_process_pool(["cpu"] * len(os.sched_getaffinity(0)))
        emb = st.encode(texts, batch_size=32, pool=workers)
        st.stop_multi_process_pool(workers)
    else:
        emb = st.encode(texts, batch_size=32, convert_to_numpy=True)
    np.save(out, np.asarray(emb, dtype=np.float32))
    return {}


def scale(args) -> int:
    from twinfold.models.shards import ShardedEmbeddings

    print(f"{date.today()}; machine: {machine()}; load average {os.getloadavg()[0]:.1f}; max_length {args.max_length}, "
          f"batch {args.batch_size}", flush=True)
    rows, failed = [], 0
    threads = ""
    if args.threads_per_process:  # the encode CLI reads it (models.runtime.share_cpu_cores)
        os.environ["TWINFOLD_NUM_THREADS"] = str(args.threads_per_process)
        threads = f", {args.threads_per_process} thread{'s' if args.threads_per_process > 1 else ''} each"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = scale_models(tmp, args.max_length)
        for count in args.scale_docs:
            documents = tmp / f"docs-{count}.jsonl"
            write_documents(documents, count)
            for name, model in models.items():
                if name != "tiny BERT" and count > args.minilm_docs:
                    continue
                vectors = None
                for processes in args.processes:
                    out = tmp / f"out-{processes}"
                    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                                "no", "-m"] if processes > 1 else [sys.executable, "-m"]
                    result = timed([*launcher, "twinfold.models.encode", "--model", model, "--input", documents,
                                    "--output", out, "--format", "parquet", "--batch-size", args.batch_size,
                                    "--no-progress"])
                    rows.append((name, count, f"twinfold, {processes} process{'es' if processes > 1 else ''}{threads}",
                                 result))
                    print(f"  {rows[-1][:3]}: {count / result['seconds']:.0f} docs/s, peak RSS "
                          f"{result['peak'] / GB:.2f} GB", flush=True)
                    if vectors is None and name != "tiny BERT":
                        vectors = np.concatenate([p.embeddings for p in ShardedEmbeddings(out).parts()])
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                if vectors is None:
                    continue
                for pool in (False, True):
                    result = timed([sys.executable, __file__, "--child-st", model, documents, tmp / "st.npy"]
                                   + (["--child-st-pool"] if pool else []))
                    gap = float(np.abs(np.load(tmp / "st.npy") - vectors).max())
                    side = "sentence-transformers" + (" (multi-process pool)" if pool else "")
                    rows.append((name, count, side, {**result, "gap": gap}))
                    print(f"  {rows[-1][:3]}: {count / result['seconds']:.0f} docs/s, max |difference| {gap:.1e}",
                          flush=True)
                    failed |= gap > 1e-5
    print("\n| model | documents | encoder | docs/s | peak RSS (GB) | max abs diff to twinfold |")
    print("|---|---:|---|---:|---:|---:|")
    for name, count, side, r in rows:
        gap = f"{r['gap']:.1e}" if "gap" in r else ""
        print(f"| {name} | {count:,} | {side} | {count / r['seconds']:.0f} | {r['peak'] / GB:.2f} | {gap} |")
    if failed:
        print("FAILED: sentence-transformers' vectors differ from twinfold's by more than 1e-5")
    return int(failed)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_run:
        print(json.dumps(run_timed(json.loads(args.child_run))))
        return 0
    if args.child_st:
        print(json.dumps(st_child(*args.child_st, pool=args.child_st_pool)))
        return 0
    if args.scale:
        return scale(args)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    _, docs = sample(args)
    flops, lengths = encoder_flops(docs, args.max_length, training=False, model=args.model)
    order = sides(args.device, args.unpad)
    dtypes = ("float32", "bfloat16") if any("bf16" in side for side in order) else ("float32",)
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
        rate = rates["bfloat16" if "bf16" in side else "float32"]
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
