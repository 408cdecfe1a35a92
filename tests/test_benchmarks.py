"""The benchmark scripts at toy size: they run, and their correctness checks against sentence-transformers pass
(same losses after the same updates; same float32 embeddings, in PyTorch and in ONNX Runtime). Their timings are
not checked here."""
import json
import os
import sys
from pathlib import Path

from tests.helpers import REPO, run_process
from twinfold.models.runtime import cpu_has_bf16


def run_script(name: str, *args: str, data_dir: Path) -> str:
    command = [sys.executable, REPO / "scripts" / name, *args]
    return run_process(command, env={**os.environ, "TWINFOLD_DATA": str(data_dir)}, check=True).stdout


def test_bench_train_matches_sentence_transformers_losses(data_dir):
    out = run_script("bench_train.py", "--batch-size", "4", "--max-length", "32", "--steps", "1", "--rounds", "1",
                     "--quantization", "binary,int8", "--unpad", data_dir=data_dir)
    check = next(line for line in out.splitlines() if line.startswith("loss check"))
    assert float(check.rsplit(" ", 1)[1]) <= 1e-5  # unpadded twinfold's losses too
    assert "| twinfold |" in out and "| sentence-transformers |" in out and "| twinfold, unpadded |" in out
    assert "| twinfold + quantization terms |" in out and "quantization terms (binary,int8): " in out


def test_bench_train_cached_mode_with_lora_matches_sentence_transformers_with_peft(data_dir):
    out = run_script("bench_train.py", "--batch-size", "6", "--mini-batch-size", "4", "--max-length", "32",
                     "--steps", "1", "--rounds", "1", "--lora", "8", data_dir=data_dir)
    assert "(cached, mini-batch 4)" in out and "LoRA r 8" in out and "| twinfold |" in out
    check = next(line for line in out.splitlines() if line.startswith("loss check"))
    assert float(check.rsplit(" ", 1)[1]) <= 1e-5  # the same adapter from the same seed: one computation


def test_bench_encode_gives_sentence_transformers_embeddings(data_dir):
    out = run_script("bench_encode.py", "--docs", "8", "--max-length", "32", "--rounds", "1", "--unpad",
                     data_dir=data_dir)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| twinfold")}
    expected = {"twinfold", "twinfold int8", "twinfold onnx", "twinfold onnx-int8", "twinfold unpadded"}
    if cpu_has_bf16():  # a CPU with bf16 units also runs the bf16 side
        expected.add("twinfold bf16")
    assert set(rows) == expected
    for side in ("twinfold", "twinfold onnx", "twinfold unpadded"):  # max abs diff to sentence-transformers' float32
        assert float(rows[side].split("|")[-3]) <= 1e-4


def test_bench_encode_scale_gives_sentence_transformers_embeddings(data_dir):
    out = run_script("bench_encode.py", "--scale", "--scale-docs", "64", "--minilm-docs", "64", "--processes", "1",
                     data_dir=data_dir)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0].strip(), r[2].strip()) for r in rows] == [
        ("tiny BERT", "twinfold, 1 process"), ("all-MiniLM-L6-v2", "twinfold, 1 process"),
        ("all-MiniLM-L6-v2", "sentence-transformers"),
        ("all-MiniLM-L6-v2", "sentence-transformers (multi-process pool)")]
    assert all(float(r[5]) <= 1e-5 for r in rows[2:])  # the same vectors as twinfold's


def test_bench_rotation_compares_steps_on_held_out_queries(data_dir, tiny_bert_path):
    out = run_script("bench_rotation.py", str(tiny_bert_path), "--data", str(data_dir / "scifact-nano"), "--split",
                     "test", "--folds", "2", "--steps", "0,3", "--dims", "128,64", data_dir=data_dir)
    assert "(test: 50 queries, 1000 documents), 2 folds" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == [" steps a block ", " fit seconds ", " gap at 128 ", " gap at 64 "]
    assert [int(r[0]) for r in rows[1:]] == [0, 3] and all(-1 <= float(g) <= 1 for r in rows[1:] for g in r[2:])


def test_encoder_flops_by_hand(tiny_bert_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from benchlib import encoder_flops

    flops, lengths = encoder_flops(["cell", "gene expression"], 32, training=False, model=str(tiny_bert_path))
    assert lengths == [3, 4]  # with [CLS] and [SEP]
    # hidden 128, feed-forward 256, 2 layers: 2 * (4 * 128^2 + 2 * 128 * 256) = 262144 per token and layer,
    # plus attention 4 * n * 128
    assert flops == 2 * (3 * (262144 + 4 * 3 * 128) + 4 * (262144 + 4 * 4 * 128))
    assert encoder_flops(["cell"], 2, training=True, model=str(tiny_bert_path)) == \
        (3 * 2 * 2 * (262144 + 4 * 2 * 128), [2])


def test_bench_data_runs_training_cold_then_warm_and_prints_the_table(data_dir, tiny_bert_path, tmp_path):
    out = run_script("bench_data.py", "--rows", "300", "--model", str(tiny_bert_path), "--workdir", str(tmp_path),
                     data_dir=data_dir)
    table = [line.split("|") for line in out.splitlines() if line.startswith("| 300 |")]
    rows = {cells[2].strip(): cells[3:-1] for cells in table}
    assert set(rows) == {"cold", "warm"}
    for cells in rows.values():  # rows/s, load + validate, tokenize, then to the loop, to first step, peak RSS (GB)
        numbers = [float(c.replace(",", "")) for c in cells]
        assert len(numbers) == 6 and all(n >= 0 for n in numbers) and numbers[-1] > 0.1


def test_bench_data_streaming_runs_and_prints_its_row(data_dir, tiny_bert_path, tmp_path):
    out = run_script("bench_data.py", "--streaming", "--rows", "300", "--model", str(tiny_bert_path), "--workdir",
                     str(tmp_path), data_dir=data_dir)
    cells = next(line.split("|") for line in out.splitlines() if line.startswith("| 300 |"))[2:-1]
    numbers = [float(c) for c in cells]  # file GB, to the loop, first block, whole run, peak RSS (GB)
    assert len(numbers) == 5 and all(n >= 0 for n in numbers) and numbers[-1] > 0.1


def test_bench_data_pairs_are_seeded_with_the_promised_lengths(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_data import write_pairs

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_pairs(tmp_path / f"{name}.jsonl", 25, seed=seed, block=10)
    files = [(tmp_path / f"{name}.jsonl").read_bytes() for name in "abc"]
    assert files[0] == files[1] != files[2]
    pairs = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(pairs) == 25 and len({p["anchor"] for p in pairs}) == 25
    assert all(10 <= len(p["anchor"].split()) <= 20 and 100 <= len(p["positive"].split()) <= 140 for p in pairs)
    write_pairs(tmp_path / "repeated.jsonl", 25, block=10, distinct=10)  # the first 10 rows, twice, then 5 of them
    lines = (tmp_path / "repeated.jsonl").read_text().splitlines()
    assert len(lines) == 25 and lines[10:20] == lines[:10] and lines[20:] == lines[:5] and len(set(lines)) == 10
