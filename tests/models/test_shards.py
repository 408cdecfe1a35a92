"""Sharded embedding datasets (`models.encode --format parquet --output DIR`): streamed input, parts written by
one or two processes, resumed after a kill, refused when the settings, model or input changed, kept in bounded
memory; a synthetic corpus and the tiny random BERT."""
import contextlib
import io
import json
import random
import re
import signal
import sys
import time
import tracemalloc
from argparse import Namespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import free_port, like_a_new_process, run_process, start_process
from twinfold.models import BiEncoder, EmbeddingSet, shards
from twinfold.models.encode import encode_parts, main, start_dataset
from twinfold.models.files.atomic import MANIFEST, verify_manifest
from twinfold.models.files.rows import input_files
from twinfold.models.quantize import calibrate_int8
from twinfold.models.shards import PartsProgress, ShardedEmbeddings, read_header

WORDS = "cell gene protein membrane signal receptor kinase tumour immune response pathway enzyme binding".split()


def corpus(n: int, seed: int = 0, words: tuple[int, int] = (2, 30)) -> list[dict]:
    """`n` documents `d0`, `d1`, ... of random words, of random lengths."""
    rng = random.Random(seed)
    return [{"_id": f"d{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(*words)))} for i in range(n)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def encode(*args: str) -> tuple[int, str, str]:
    """`models.encode ARGS` in this process, as in a new one: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with like_a_new_process(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*map(str, args), "--no-progress"])
    return code, out.getvalue(), err.getvalue()


def encoded_texts(monkeypatch) -> list[str]:
    """Record every text BiEncoder.encode embeds (the real method still runs)."""
    seen, real = [], BiEncoder.encode

    def recording(self, texts, *args, **kwargs):
        seen.extend(texts)
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(BiEncoder, "encode", recording)
    return seen


def vectors(folder) -> tuple[list[str], np.ndarray]:
    dataset = ShardedEmbeddings(folder)
    parts = list(dataset.parts())
    return [i for p in parts for i in p.ids], np.concatenate([p.embeddings for p in parts])


def test_a_dataset_holds_what_the_single_file_holds_and_int8_is_calibrated_on_a_seeded_sample(tiny_bert_path,
                                                                                               tmp_path):
    docs = write(tmp_path / "docs.jsonl", corpus(230))
    model = ["--model", tiny_bert_path, "--input", docs]
    assert encode(*model, "--output", tmp_path / "one.safetensors", "--dim", 64)[0] == 0
    code, out, _ = encode(*model, "--output", tmp_path / "ds", "--format", "parquet", "--part-rows", 50, "--dim", 64)
    assert code == 0 and f"wrote 230 embeddings (float32, dim 64) in 5 parts to {tmp_path / 'ds'}" in out
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(
        [MANIFEST] + [f"part-{k:06d}.{ext}" for k in range(5) for ext in ("parquet", "json")])
    assert verify_manifest(tmp_path / "ds") is None  # every part's size and SHA-256, as checkpoints have
    whole = EmbeddingSet.load(tmp_path / "one.safetensors")
    ids, emb = vectors(tmp_path / "ds")
    assert ids == whole.ids
    np.testing.assert_allclose(emb, whole.embeddings, atol=1e-5)
    part = pq.read_table(tmp_path / "ds" / "part-000001.parquet")  # each part is a plain Parquet embedding file
    assert part.column_names == ["id", "embedding", "content_hash"] and part.column("id")[0].as_py() == "d50"

    code, _, _ = encode(*model, "--output", tmp_path / "int8", "--format", "parquet", "--part-rows", 50,
                        "--precision", "int8", "--calibration-sample", 100)
    header = read_header(tmp_path / "int8")
    assert code == 0 and (header["calibration"]["sample_size"], header["calibration"]["seed"]) == (100, 0)
    full = BiEncoder.from_pretrained(tiny_bert_path).encode([d["text"] for d in corpus(230)])
    reference = calibrate_int8(full, sample_size=100, seed=0)  # what the in-memory calibration draws
    dataset = ShardedEmbeddings(tmp_path / "int8")
    np.testing.assert_allclose(dataset.calibration.starts, reference.starts, atol=1e-5)
    np.testing.assert_allclose(dataset.calibration.steps, reference.steps, atol=1e-6)
    assert all(np.array_equal(p.calibration.steps, dataset.calibration.steps) for p in dataset.parts())


def test_csv_tsv_parquet_and_a_folder_of_shards_read_as_the_jsonl_file(tiny_bert_path, tmp_path):
    rows = corpus(60)
    write(tmp_path / "docs.jsonl", rows)
    folder = tmp_path / "shards" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:25]), folder / "train-00000-of-00002.parquet")
    write(folder / "train-00001-of-00002.jsonl", rows[25:])
    (tmp_path / "docs.tsv").write_text("_id\ttext\n" + "".join(f"{r['_id']}\t{r['text']}\n" for r in rows))
    (tmp_path / "docs.csv").write_text("_id,text\n" + "".join(f"{r['_id']},\"{r['text']}\"\n" for r in rows))
    for source in ("docs.jsonl", "docs.tsv", "docs.csv", "shards"):
        assert encode("--model", tiny_bert_path, "--input", tmp_path / source, "--output", tmp_path / f"{source}.out",
                      "--format", "parquet", "--part-rows", 16)[0] == 0
    reference = vectors(tmp_path / "docs.jsonl.out")
    assert reference[0] == [r["_id"] for r in rows]
    for source in ("docs.tsv", "docs.csv", "shards"):
        ids, emb = vectors(tmp_path / f"{source}.out")
        assert ids == reference[0]
        np.testing.assert_array_equal(emb, reference[1])


def test_two_processes_write_the_dataset_that_one_process_writes(tiny_bert_path, tmp_path):
    docs = write(tmp_path / "docs.jsonl", corpus(170))
    args = ["--model", tiny_bert_path, "--input", docs, "--format", "parquet", "--part-rows", 20]
    launched = run_process([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                            "--main_process_port", free_port(), "-m", "twinfold.models.encode", *args,
                            "--output", tmp_path / "two"], check=True)
    assert "wrote 170 embeddings (float32, dim 128) in 9 parts" in launched.stdout
    assert launched.stdout.count("wrote") == 1  # the main process writes the manifest and reports
    # the main process's bars: process 1 writes parts 0, 2, 4, 6, 8 (90 rows), process 2 parts 1, 3, 5, 7 (80)
    bars = re.findall(r"encode \(process (\d) of 2\): 100%\|[^|]*\| (\d+)/(\d+)", launched.stderr)
    assert sorted(set(bars)) == [("1", "90", "90"), ("2", "80", "80")], launched.stderr[-2000:]
    assert encode(*args, "--output", tmp_path / "one")[0] == 0
    (ids_two, two), (ids_one, one) = vectors(tmp_path / "two"), vectors(tmp_path / "one")
    assert ids_two == ids_one == [f"d{i}" for i in range(170)]
    np.testing.assert_allclose(two, one, atol=1e-5)
    assert [p.hashes for p in ShardedEmbeddings(tmp_path / "two").parts()] == \
        [p.hashes for p in ShardedEmbeddings(tmp_path / "one").parts()]


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_resumes_to_the_dataset_of_an_uninterrupted_run(tiny_bert_path, tmp_path, monkeypatch, stop):
    rows = 1500
    docs = write(tmp_path / "docs.jsonl", corpus(rows, words=(20, 30)))
    args = ["--model", tiny_bert_path, "--input", docs, "--format", "parquet", "--part-rows", 25]
    process = start_process([sys.executable, "-m", "twinfold.models.encode", *map(str, args), "--no-progress",
                             "--output", str(tmp_path / "killed")])
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "killed").glob("part-*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(stop)
    process.wait(timeout=60)
    assert not read_header(tmp_path / "killed")["complete"], "the run ended before it was stopped"
    complete = len(list((tmp_path / "killed").glob("part-*.json")))
    assert complete >= 3

    seen = encoded_texts(monkeypatch)
    code, out, _ = encode(*args, "--output", tmp_path / "killed")
    assert code == 0 and f"wrote {rows} embeddings" in out
    assert len(seen) <= rows - 25 * complete  # the complete parts are not encoded again
    assert encode(*args, "--output", tmp_path / "whole")[0] == 0
    (ids, resumed), (ids_whole, whole) = vectors(tmp_path / "killed"), vectors(tmp_path / "whole")
    assert ids == ids_whole
    np.testing.assert_allclose(resumed, whole, atol=1e-5)
    assert verify_manifest(tmp_path / "killed") is None


def test_a_resume_with_other_settings_another_model_or_changed_input_is_refused(tiny_bert_path, tmp_path):
    rows = corpus(100)
    docs = write(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "ds"
    args = ["--model", tiny_bert_path, "--input", docs, "--output", out, "--format", "parquet", "--part-rows", 30]
    assert encode(*args)[0] == 0
    (out / "part-000003.json").unlink()  # as a run killed before its last part
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, _, err = encode(*args, "--dim", 64)
    assert code == 2 and f"error: {out} holds embeddings of other settings, another model or another input: dim " \
        "128 (now 64)." in err
    other = tmp_path / "other"
    BiEncoder.from_pretrained(tiny_bert_path, max_length=16).save_pretrained(other)
    code, _, err = encode("--model", other, *args[2:])
    assert code == 2 and "another input: fingerprint '" in err
    rows[40]["text"] += " (corrected)"
    code, _, err = encode(*args[:2], "--input", write(tmp_path / "changed.jsonl", rows), *args[4:])
    assert code == 2 and f"error: {tmp_path / 'changed.jsonl'}: rows 30-59 are not those that part 1 of {out} was " \
        f"made from; a run resumes only on the input it started with (bring the dataset in step with this input: " \
        f"--update {out})" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_bad_line_is_named_and_the_parts_before_it_are_kept(tiny_bert_path, tmp_path, monkeypatch):
    rows = corpus(100)
    rows[72]["text"] = " "
    docs = write(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "ds"
    args = ["--model", tiny_bert_path, "--input", docs, "--output", out, "--format", "parquet", "--part-rows", 30]
    code, _, err = encode(*args)
    assert code == 2 and f"error: {docs}:73: field 'text' is missing, empty or not a string" in err
    assert sorted(p.name for p in out.glob("part-*.json")) == ["part-000000.json", "part-000001.json"]
    rows[72]["text"] = "a repaired line"
    write(docs, rows)
    seen = encoded_texts(monkeypatch)
    assert encode(*args)[0] == 0
    assert seen and len(seen) == 40  # parts 2 and 3 only
    rows[5]["_id"] = "d7"
    write(docs, rows)
    code, _, err = encode(*args[:4], "--output", tmp_path / "dup", *args[6:], "--part-rows", 10)
    assert code == 2 and f"{docs}:8: duplicate id 'd7' (first at {docs}:6)" in err


def test_an_id_repeated_in_another_part_is_named_and_the_dataset_is_not_finished(tiny_bert_path, tmp_path):
    rows = corpus(60)
    rows[47]["_id"] = "d3"  # part 1 repeats an id of part 0: each part alone has unique ids
    docs = write(tmp_path / "docs.jsonl", rows)
    out = tmp_path / "ds"
    args = ["--model", tiny_bert_path, "--input", docs, "--output", out, "--format", "parquet", "--part-rows", 30]
    code, _, err = encode(*args)
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {docs}:48: duplicate id 'd3' (first at {docs}:4); " \
        f"ids must be unique. The parts written stay: correct the input, then run with --update {out}"
    assert not read_header(out).get("complete") and len(list(out.glob("part-*.parquet"))) == 2
    rows[47]["_id"] = "d47"
    write(docs, rows)
    assert encode(*args[:4], "--update", out, *args[6:])[0] == 0
    assert vectors(out)[0] == [f"d{i}" for i in range(60)]


def test_memory_does_not_grow_with_the_corpus(tiny_bert_path, tmp_path):
    """Python's peak allocation while the parts of 1,500 documents are read, encoded and written is that of 300:
    holding every text (about 350 bytes each) or row would add more than 1,200 x 300 bytes."""
    model = BiEncoder.from_pretrained(tiny_bert_path)
    peaks = []
    for n in (50, 300, 1500):  # the first run pays for what is made once per process (imports, caches)
        docs = write(tmp_path / f"docs{n}.jsonl", corpus(n, words=(40, 50)))
        args = Namespace(input=docs, compute="float32", precision="int8", dim=None, kind="document", field="text",
                         id_field="_id", part_rows=100, update=None, overwrite=False, batch_size=32,
                         calibration_sample=100)
        out, files = tmp_path / f"ds{n}", input_files(docs)
        start_dataset(model, args, None, files, out)
        tracemalloc.start()
        counts = encode_parts(model, files, out, read_header(out), 0, 1, False, 32)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert counts["new"] == n
    assert peaks[2] - peaks[1] < 1200 * 300 / 2, peaks


def test_update_and_check_work_on_a_dataset(tiny_bert_path, tmp_path, monkeypatch):
    rows = corpus(100)
    out = tmp_path / "ds"
    args = ["--model", tiny_bert_path, "--format", "parquet", "--part-rows", 30]
    assert encode(*args, "--input", write(tmp_path / "v1.jsonl", rows), "--output", out)[0] == 0
    rows[10]["text"] += " Erratum."
    rows[95]["text"] = rows[95]["text"].upper()
    rows.append({"_id": "new", "text": "a new abstract about yeast"})
    v2 = write(tmp_path / "v2.jsonl", rows)
    seen = encoded_texts(monkeypatch)
    code, out_text, _ = encode(*args, "--input", v2, "--update", out)
    assert code == 0 and "re-encoded 3 documents (1 new, 2 changed), kept 98, removed 0" in out_text
    assert sorted(seen) == sorted([rows[10]["text"], rows[95]["text"], "a new abstract about yeast"])
    assert encode(*args, "--input", v2, "--output", tmp_path / "fresh")[0] == 0
    (ids, updated), (ids_fresh, fresh) = vectors(out), vectors(tmp_path / "fresh")
    assert ids == ids_fresh and len(ids) == 101
    np.testing.assert_allclose(updated, fresh, atol=1e-5)
    code, text, _ = encode("--model", tiny_bert_path, "--check", out)
    assert code == 0 and "(fingerprint" in text and "101 embeddings" in text
    other = tmp_path / "other"
    BiEncoder.from_pretrained(tiny_bert_path, max_length=16).save_pretrained(other)
    assert encode("--model", other, "--check", out)[0] == 1
    code, _, err = encode("--model", other, "--input", v2, "--update", out)
    assert code == 2 and "was made by another model or settings" in err


def test_an_output_folder_holding_other_files_is_refused(tiny_bert_path, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    docs = write(tmp_path / "docs.jsonl", corpus(10))
    code, _, err = encode("--model", tiny_bert_path, "--input", docs, "--output", tmp_path / "notes",
                          "--format", "parquet")
    assert code == 2 and "holds files that are not a twinfold embedding dataset (e.g. 'keep.txt')" in err
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["keep.txt"]


def test_stores_take_a_dataset_part_by_part_as_they_take_the_file(tiny_bert_path, tmp_path, postgres_dsn):
    import psycopg

    from twinfold.models.stores import build_faiss, exact_hits, faiss_search, load_pgvector, pgvector_search

    docs = write(tmp_path / "docs.jsonl", corpus(230))
    queries = write(tmp_path / "queries.jsonl", corpus(5, seed=1))
    model = ["--model", tiny_bert_path]
    assert encode(*model, "--input", docs, "--output", tmp_path / "ds", "--format", "parquet",
                  "--part-rows", 50)[0] == 0
    assert encode(*model, "--input", docs, "--output", tmp_path / "one.safetensors")[0] == 0
    assert encode(*model, "--input", queries, "--kind", "query", "--output", tmp_path / "q.safetensors")[0] == 0
    dataset, whole = ShardedEmbeddings(tmp_path / "ds"), EmbeddingSet.load(tmp_path / "one.safetensors")
    q = EmbeddingSet.load(tmp_path / "q.safetensors").embeddings
    expected = exact_hits(whole, q, 10)
    assert [list(h) for h in exact_hits(dataset, q, 10)] == [list(h) for h in expected]
    index = build_faiss(dataset, "flat")
    assert index.ntotal == 230
    assert [list(h) for h in faiss_search(index, dataset.ids, q, 10)] == [list(h) for h in expected]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        load_pgvector(conn, dataset, "sharded")
        assert conn.execute("SELECT count(*) FROM sharded").fetchone()[0] == 230
        found = pgvector_search(conn, EmbeddingSet.load(tmp_path / "q.safetensors"), 10, "sharded", ef_search=1000)
    assert [list(h) for h in found] == [list(h) for h in expected]


@pytest.mark.parametrize("pass_rows", [3, 1 << 20])
def test_repeated_id_is_found_in_hash_buckets_of_any_size(tmp_path, monkeypatch, pass_rows):
    """The check sorts at most about `HASH_PASS_ROWS` hashes at a time (3: 17 bucket files for 50 rows; or one) and
    names the first two copies of the repeated id."""
    monkeypatch.setattr(shards, "HASH_PASS_ROWS", pass_rows)
    names = [f"d{i}" for i in range(50)]
    names[23] = names[41] = "d7"  # d7 at rows 7 (part 0), 23 (part 2) and 41 (part 4)

    def write_parts(ids):
        for k in range(5):
            pq.write_table(pa.table({"id": ids[k * 10:(k + 1) * 10]}), tmp_path / shards.part_file(k))

    write_parts(names)
    assert shards.repeated_id(tmp_path, 5, 10) == ("d7", 7, 23)
    write_parts([f"d{i}" for i in range(50)])
    assert shards.repeated_id(tmp_path, 5, 10) is None and shards.repeated_id(tmp_path, 0, 10) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [shards.part_file(k) for k in range(5)]  # nothing left


def test_progress_counts_the_parts_each_process_writes_in_this_run(tmp_path):
    header = {"part_rows": 10, "rows": 45}  # parts of 10, 10, 10, 10 and 5 rows; 2 processes
    tmp_path.joinpath(shards.record_file(0)).write_text("{}")  # written by an earlier run
    out = io.StringIO()
    progress = PartsProgress(tmp_path, header, 2, file=out)
    assert [bar.total for bar in progress.bars] == [15, 20]  # process 1: parts 2 and 4; process 2: parts 1 and 3
    for k in (1, 4):
        tmp_path.joinpath(shards.record_file(k)).write_text("{}")
    progress.poll()
    assert [bar.n for bar in progress.bars] == [0, 10]  # process 1 writes part 2 before part 4
    time.sleep(0.05)  # past the file system's timestamp tick
    tmp_path.joinpath(shards.record_file(0)).write_text("{}")  # a part there at the start, written again
    with progress:
        for k in (2, 3):
            tmp_path.joinpath(shards.record_file(k)).write_text("{}")
    assert [(bar.n, bar.total) for bar in progress.bars] == [(25, 25), (20, 20)]
    assert "encode (process 1 of 2): 100%" in out.getvalue() and "encode (process 2 of 2): 100%" in out.getvalue()
