"""Incremental re-indexing (`models.encode --update`) and the drift guard (`--check`), on SciFact-nano documents."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from twinfold.models import BiEncoder, EmbeddingSet
from twinfold.models.encode import main
from twinfold.models.export import main as export_main
from twinfold.models.files.atomic import MANIFEST
from twinfold.models.quantize import Int8Calibration, calibrate_int8
from twinfold.train.mine import main as mine_main


@pytest.fixture
def docs(data_dir):
    rows = [json.loads(line) for line in open(data_dir / "scifact-nano" / "corpus.jsonl")][:200]
    return [{"_id": r["_id"], "text": (r["title"] + " " + r["text"]).strip()} for r in rows]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def errors(capsys) -> list[str]:
    """The `error:` lines of stderr (progress bars aside); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error")]


def encode_spy(monkeypatch):
    """Record every text BiEncoder.encode embeds (the real method still runs)."""
    seen = []
    real = BiEncoder.encode

    def recording(self, texts, *args, **kwargs):
        seen.extend(texts)
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(BiEncoder, "encode", recording)
    return seen


@pytest.mark.parametrize("precision", ["float32", "binary"])
def test_update_re_encodes_exactly_the_changed_documents_and_equals_a_full_encode(
        tiny_bert_path, docs, tmp_path, monkeypatch, capsys, precision):
    model = ["--model", str(tiny_bert_path), "--no-progress", "--batch-size", "16"]
    index = tmp_path / "index.safetensors"
    assert main([*model, "--input", str(write(tmp_path / "v1.jsonl", docs)), "--output", str(index),
                 "--precision", precision, "--dim", "64"]) == 0
    # 1% of the 200 documents change; one is removed and one is new
    changed = [dict(d) for d in docs]
    changed[17]["text"] += " Erratum: corrected."
    changed[150]["text"] = changed[150]["text"].upper()
    del changed[42]
    changed.insert(5, {"_id": "new-doc", "text": "A new abstract about protein folding in yeast."})
    v2 = write(tmp_path / "v2.jsonl", changed)
    seen = encode_spy(monkeypatch)
    capsys.readouterr()
    assert main([*model, "--input", str(v2), "--update", str(index)]) == 0
    assert sorted(seen) == sorted([changed[18]["text"], changed[150]["text"], changed[5]["text"]])
    assert "re-encoded 3 documents (1 new, 2 changed), kept 197, removed 1" in capsys.readouterr().out

    full = tmp_path / "full.safetensors"
    assert main([*model, "--input", str(v2), "--output", str(full), "--precision", precision, "--dim", "64"]) == 0
    updated, rebuilt = EmbeddingSet.load(index), EmbeddingSet.load(full)
    assert updated.ids == rebuilt.ids == [d["_id"] for d in changed]
    assert updated.hashes == rebuilt.hashes and updated.dim == 64 and updated.precision == precision
    if precision == "float32":
        np.testing.assert_allclose(updated.embeddings, rebuilt.embeddings, atol=1e-5)
    else:  # sign bits: equal except where a value sits within float noise of zero
        assert (updated.embeddings != rebuilt.embeddings).mean() < 1e-3


def test_update_refuses_a_file_of_another_model_and_says_how_to_rebuild(tiny_bert_path, docs, tmp_path, capsys):
    index = tmp_path / "index.safetensors"
    v1 = write(tmp_path / "v1.jsonl", docs[:5])
    assert main(["--model", str(tiny_bert_path), "--input", str(v1), "--output", str(index), "--no-progress"]) == 0
    other = tmp_path / "other"
    BiEncoder.from_pretrained(tiny_bert_path, max_length=16).save_pretrained(other)
    before = index.read_bytes()
    assert main(["--model", str(other), "--input", str(v1), "--update", str(index), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was made by another model or settings" in err
    assert f"rebuild it: python -m twinfold.models.encode --model {other} --input {v1} --output {index}" in err
    assert index.read_bytes() == before

    assert main(["--model", str(tiny_bert_path), "--check", str(index)]) == 0
    assert "belongs to" in capsys.readouterr().out
    assert main(["--model", str(other), "--check", str(index)]) == 1
    assert "does not belong to" in capsys.readouterr().out


def test_duplicate_ids_are_an_error_naming_the_line(tiny_bert_path, tmp_path, capsys):
    path = write(tmp_path / "dup.jsonl", [{"_id": "a", "text": "one"}, {"_id": "b", "text": "two"},
                                         {"_id": "a", "text": "three"}])
    assert main(["--model", str(tiny_bert_path), "--input", str(path), "--output", str(tmp_path / "o")]) == 2
    assert f"{path}:3: duplicate id 'a' (first at {path}:1)" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["float32", "int8", "binary"])
def test_parquet_file_holds_what_the_safetensors_file_holds(tiny_bert_path, docs, tmp_path, precision):
    model = ["--model", str(tiny_bert_path), "--no-progress", "--input", str(write(tmp_path / "d.jsonl", docs[:40])),
             "--precision", precision, "--dim", "64"]
    assert main([*model, "--output", str(tmp_path / "e.safetensors")]) == 0
    reference = EmbeddingSet.load(tmp_path / "e.safetensors")
    reference.save(tmp_path / "e.parquet", format="parquet")
    loaded = EmbeddingSet.load(tmp_path / "e.parquet")
    assert loaded.embeddings.dtype == reference.embeddings.dtype
    np.testing.assert_array_equal(loaded.embeddings, reference.embeddings)
    if precision == "int8":
        np.testing.assert_array_equal(loaded.calibration.starts, reference.calibration.starts)
        np.testing.assert_array_equal(loaded.calibration.steps, reference.calibration.steps)
    assert {**vars(loaded), "embeddings": None, "calibration": None} == \
        {**vars(reference), "embeddings": None, "calibration": None}


def test_parquet_output_is_plain_parquet_and_updates_in_place(tiny_bert_path, docs, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = ["--model", str(tiny_bert_path), "--no-progress"]
    index = tmp_path / "index.parquet"
    assert main([*model, "--input", str(write(tmp_path / "v1.jsonl", docs[:20])), "--output", str(index),
                 "--format", "parquet", "--precision", "binary", "--dim", "60"]) == 0
    table = pq.read_table(index)
    assert table.column_names == ["id", "embedding", "content_hash"]
    assert table.schema.field("embedding").type == pa.list_(pa.uint8(), 8)  # 60 sign bits packed in 8 bytes
    assert table.column("id").to_pylist() == [d["_id"] for d in docs[:20]]
    meta = table.schema.metadata
    assert (meta[b"precision"], meta[b"dim"], meta[b"kind"]) == (b"binary", b"60", b"document")
    assert meta[b"fingerprint"] == BiEncoder.from_pretrained(tiny_bert_path).fingerprint().encode()

    changed = [dict(d) for d in docs[:20]]
    changed[3]["text"] += " Erratum."
    capsys.readouterr()
    assert main([*model, "--input", str(write(tmp_path / "v2.jsonl", changed)), "--update", str(index)]) == 0
    assert "re-encoded 1 documents (0 new, 1 changed), kept 19, removed 0" in capsys.readouterr().out
    assert index.read_bytes()[:4] == b"PAR1"
    assert main([*model, "--check", str(index)]) == 0

    pq.write_table(pa.table({"note": ["keep me"]}), tmp_path / "notes.parquet")
    before = (tmp_path / "notes.parquet").read_bytes()
    assert main([*model, "--input", str(tmp_path / "v2.jsonl"), "--output", str(tmp_path / "notes.parquet"),
                 "--format", "parquet"]) == 2
    assert "notes.parquet exists and is not a twinfold embedding file" in capsys.readouterr().err
    assert (tmp_path / "notes.parquet").read_bytes() == before


def test_a_file_that_is_no_embedding_file_is_a_one_line_error(tiny_bert_path, tmp_path, capsys):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "not embeddings"}\n')
    assert main(["--model", str(tiny_bert_path), "--check", str(notes)]) == 2
    assert f"error: {notes}: not a twinfold embedding file (neither Parquet nor safetensors" in capsys.readouterr().err


def test_int8_needs_two_documents_and_a_file_calibrated_on_one_is_refused(tiny_bert_path, docs, tmp_path, capsys):
    one = write(tmp_path / "one.jsonl", docs[:1])
    model = ["--model", str(tiny_bert_path), "--no-progress", "--precision", "int8"]
    assert main([*model, "--input", str(one), "--output", str(tmp_path / "one.safetensors")]) == 2
    assert errors(capsys) == [
        f"error: {one}: int8 embeddings are calibrated on the documents encoded, and 1 cannot give each dimension a "
        "range: encode at least 2 documents together, or use --precision float32"]
    with pytest.raises(ValueError, match="needs at least 2 embeddings"):
        calibrate_int8(np.ones((1, 4), np.float32))
    # a file calibrated on one document (every step 0) cannot be updated: its documents would all be alike
    collapsed = tmp_path / "collapsed.safetensors"
    EmbeddingSet(np.zeros((1, 128), np.int8), ["d0"], BiEncoder.from_pretrained(tiny_bert_path).fingerprint(),
                 "int8", 128, Int8Calibration(np.zeros(128, np.float32), np.ones(128, np.float32)),
                 hashes=["h"], kind="document").save(collapsed)
    raw = load_file(str(collapsed))
    raw["int8_steps"] = np.zeros(128, np.float32)
    with safe_open(str(collapsed), "np") as f:
        meta = f.metadata()
    save_file(raw, str(collapsed), metadata=meta)
    v2 = write(tmp_path / "v2.jsonl", docs[:5])
    assert main(["--model", str(tiny_bert_path), "--no-progress", "--input", str(v2), "--update", str(collapsed)]) == 2
    assert errors(capsys) == [
        f"error: {collapsed}: int8 calibration: no dimension has a range (every step is 0 or invalid), so every "
        "embedding quantised with it would be alike: it was computed from one embedding (or identical ones); "
        "encode it again from more documents"]
    two = tmp_path / "two.safetensors"  # two documents calibrate every dimension: they stay apart
    assert main([*model, "--input", str(write(tmp_path / "two.jsonl", docs[:2])), "--output", str(two)]) == 0
    vectors = EmbeddingSet.load(two).embeddings
    assert not np.array_equal(vectors[0], vectors[1])


@pytest.mark.parametrize("args, message", [
    (["--dim", "0"], "--dim: 0 must be a positive integer"),
    (["--dim", "1000"], "--dim: 1000 is larger than the model's dimension 128"),
    (["--batch-size", "0"], "--batch-size: 0 must be a positive integer"),
    (["--batch-size", "-1"], "--batch-size: -1 must be a positive integer"),
])
def test_bad_options_are_one_line_errors_before_the_data_is_read(tiny_bert_path, tmp_path, capsys, args, message):
    missing = tmp_path / "not-read.jsonl"  # the option is named before the input is opened
    assert main(["--model", str(tiny_bert_path), "--input", str(missing), "--output", str(tmp_path / "e.safetensors"),
                 *args]) == 2
    assert errors(capsys) == [f"error: {message}"]


def test_incomplete_files_unwritable_outputs_and_malicious_pickles_are_one_line_errors(tiny_bert_path, tmp_path,
                                                                                        capsys):
    only_fingerprint = tmp_path / "fp.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(only_fingerprint), metadata={"fingerprint": "abc"})
    assert main(["--model", str(tiny_bert_path), "--check", str(only_fingerprint)]) == 2
    assert errors(capsys) == [
        f"error: {only_fingerprint}: an incomplete twinfold embedding file (no 'precision', 'dim', 'ids', "
        "'embeddings' in it); write it again with `twinfold encode`"]

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    docs = write(tmp_path / "docs.jsonl", [{"_id": "1", "text": "a cell"}, {"_id": "2", "text": "a gene"}])
    for command, args in ((main, ["--model", "no/such-model", "--input", str(docs), "--output"]),
                          (export_main, [str(tiny_bert_path)]),
                          (mine_main, ["--model", "no/such-model", "--data", str(docs), "--out"])):
        option = {main: "--output", export_main: "DST", mine_main: "--out"}[command]
        assert command([*args, str(blocker / "sub" / "out")]) == 2  # checked before the model loads
        assert errors(capsys) == [
            f"error: {option}: cannot write {blocker / 'sub' / 'out'} ({blocker}: Not a directory); nothing was done"]

    evil = tmp_path / "evil"
    shutil.copytree(tiny_bert_path, evil)
    (evil / "model.safetensors").unlink()
    (evil / MANIFEST).unlink(missing_ok=True)
    torch.save({"weight": Payload()}, evil / "pytorch_model.bin")
    assert main(["--model", str(evil), "--allow-pickle", "--input", str(docs),
                 "--output", str(tmp_path / "e.safetensors")]) == 2
    assert errors(capsys) == [
        f"error: {evil}: its pickle weights were refused by the safe loader, which reads tensors only (Trying to load "
        "unsupported GLOBAL posix.system whose module posix is blocked.); do not load this file"]
    assert not (tmp_path / "ran").exists()


class Payload:
    """Pickles as a call to os.system: what a malicious pytorch_model.bin holds."""

    def __reduce__(self):
        return os.system, ("touch ran",)
