"""The data path at scale: a real training run (`python -m twinfold.train`) on N synthetic pairs, cold and warm
cache, or streamed.

    python scripts/bench_data.py --rows 100000,1000000 [--model PATH] [--workdir DIR]
    python scripts/bench_data.py --streaming --rows 1000000,10000000

Per N, a seeded JSONL of N (anchor, positive) pairs (about 15 and 120 words drawn from a fixed vocabulary; past
1,000,000 rows the first 1,000,000 repeat) is written into a temporary folder. Then a fresh child process runs
the smoke recipe on it (`model.max_length=32`, InfoNCE alone, `train.batch_size=8`, `train.max_steps=2`, a fresh
`data.cache_dir` and Hugging Face datasets cache) twice: cold (nothing cached) and warm (the token cache and the
datasets Arrow copy reused). With `--streaming` the dataset is `streaming: true` and runs once (nothing is
cached). The times come from the run's own log lines; peak RSS is the largest resident set of the training
process and of the workers it started (`wait4`).
"""
import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from benchlib import GB, REPO, machine

VOCABULARY_SIZE, SEED, DISTINCT = 5000, 0, 1_000_000
SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in ("a", "e", "i", "o", "u", "an", "er", "in", "ol")]
# the log lines of the run that mark its phases (train/loop.py and train/data/pairs.py)
MARKS = {"start": r"preparing \d+ training datasets", "validated": r"rows read and validated",
         "tokenized": r"rows tokenized and cached|token cache reused", "first_step": r"training from step"}
STREAM_MARKS = {"start": MARKS["start"], "first_step": MARKS["first_step"], "first_block": r"in its first \d+ rows"}


def vocabulary() -> list[str]:
    """5,000 fixed made-up words of 1 to 3 syllables (the same on every machine)."""
    rng = np.random.default_rng(SEED)
    words: set[str] = set()
    while len(words) < VOCABULARY_SIZE:
        words.add("".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), rng.integers(1, 4))))
    return sorted(words)


def write_pairs(path: Path, rows: int, seed: int = SEED, block: int = 10_000, distinct: int = DISTINCT) -> None:
    """`rows` JSONL pairs: an anchor of 10-20 words and a positive of 100-140 words, seeded; the first `distinct`
    rows repeat after that (writing them is what takes time)."""
    words = np.array(vocabulary())
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for start in range(0, min(rows, distinct), block):
            n = min(block, rows - start, distinct - start)
            lines = []
            for a, p in zip(rng.integers(10, 21, n), rng.integers(100, 141, n)):
                anchor, positive = words[rng.integers(0, len(words), a)], words[rng.integers(0, len(words), p)]
                lines.append(json.dumps({"anchor": " ".join(anchor), "positive": " ".join(positive)}))
            f.write("\n".join(lines) + "\n")
    if rows > distinct:  # copied in blocks: a large resident set here would count as the child's (see run_training)
        size = path.stat().st_size
        with open(path, "rb") as first, open(path, "ab") as f:
            for _ in range(rows // distinct - 1):
                first.seek(0)
                for start in range(0, size, 1 << 24):
                    f.write(first.read(min(1 << 24, size - start)))
            first.seek(0)
            f.writelines(itertools.islice(first, rows % distinct))


def run_training(data: Path, work: Path, model: str, name: str, streaming: bool = False) -> dict:
    """One `python -m twinfold.train` child on `data`; its phase times (s) from launch, peak RSS (bytes) and wall time.

    The peak is the child's `ru_maxrss`, which on Linux starts at this process's own peak (the child begins as its
    copy): this process must stay smaller than what it measures."""
    out = work / name
    overrides = [f"model.name_or_path={model}", "model.max_length=32", "loss.matryoshka_dims=[]", "train.batch_size=8",
                 "train.max_steps=2", "train.save_steps=null", f"train.output_dir={out}",
                 f"data.cache_dir={work / 'token-cache'}",
                 "data.train=[{path: %s, streaming: %s, columns: {anchor: anchor, positive: positive}}]"
                 % (data, str(streaming).lower())]
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf-datasets"))
    log_path = work / f"{name}.log"
    with open(log_path, "w") as log:
        launched = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "twinfold.train", "configs/smoke.yaml", *overrides], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - launched
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"training on {data} failed (exit {proc.returncode}):\n{text[-3000:]}")
    marks = STREAM_MARKS if streaming else MARKS
    return {**phase_times(text, launched, marks), "peak_rss": usage.ru_maxrss * 1024, "wall": wall}


def phase_times(log_text: str, launched: float, marks: dict[str, str] = MARKS) -> dict[str, float]:
    """Seconds from launch to the first log line of each phase (`marks`), from the lines' timestamps."""
    times = {}
    for line in re.split(r"[\r\n]+", log_text):
        stamp = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) twinfold: (.*)", line)
        if not stamp:
            continue
        for phase, pattern in marks.items():
            if phase not in times and re.search(pattern, stamp.group(2)):
                at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                times[phase] = at - launched
    missing = [phase for phase in marks if phase not in times]
    if missing:
        raise RuntimeError(f"the run's log has no line for {missing}: {list(marks.values())}")
    return times


def table_rows(rows: int, runs: dict[str, dict]) -> list[str]:
    lines = []
    for cache, t in runs.items():
        preparation = t["tokenized"] - t["start"]
        lines.append(f"| {rows:,} | {cache} | {rows / preparation:,.0f} | {t['validated'] - t['start']:.1f} "
                     f"| {t['tokenized'] - t['validated']:.1f} | {t['first_step'] - t['tokenized']:.1f} "
                     f"| {t['first_step']:.1f} | {t['peak_rss'] / GB:.2f} |")
    return lines


def stream_rows(rows: int, t: dict, size: int) -> str:
    return (f"| {rows:,} | {size / 1e9:.2f} | {t['first_step']:.1f} | {t['first_block'] - t['first_step']:.1f} "
            f"| {t['wall']:.1f} | {t['peak_rss'] / GB:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="100000,1000000", help="comma-separated dataset sizes")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model (and tokenizer)")
    parser.add_argument("--workdir", help="where the data, caches and run logs go and stay (default: a temporary "
                        "folder, removed)")
    parser.add_argument("--streaming", action="store_true", help="read the data as a stream (`streaming: true`)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="twinfold-bench-data-"))
    print(f"machine: {machine()}")
    if args.streaming:
        print("| rows | file (GB) | to the loop (s) | then first block read and tokenized (s) | whole run (s) "
              "| peak RSS (GB) |")
        print("|---:|---:|---:|---:|---:|---:|")
    else:
        print("| rows | cache | preparation rows/s | load + validate (s) | checks + tokenize (s) "
              "| then to the loop (s) | to first step (s) | peak RSS (GB) |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
    try:
        for rows in sizes:
            work = root / f"rows-{rows}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            data = work / "pairs.jsonl"
            write_pairs(data, rows)
            if args.streaming:
                print(stream_rows(rows, run_training(data, work, args.model, "streamed", True), data.stat().st_size),
                      flush=True)
            else:
                runs = {"cold": run_training(data, work, args.model, "cold")}
                runs["warm"] = run_training(data, work, args.model, "warm")
                print("\n".join(table_rows(rows, runs)), flush=True)
            if not args.workdir:
                shutil.rmtree(work)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print("streamed: to the loop from the launch of `python -m twinfold.train`; the first block (data.shuffle_buffer "
          "rows) is read, checked and tokenized in the first step; whole run: launch to exit (2 steps and the export)"
          if args.streaming else "preparation: load + validate + checks + tokenize (times from the run's log lines); "
          "to first step: from the launch of `python -m twinfold.train` to the start of its training loop")


if __name__ == "__main__":
    main()
