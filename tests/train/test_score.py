"""Teacher scores for a pair file (train.score): cross-encoders against sentence-transformers' CrossEncoder,
bi-encoders against their own embeddings, rows kept whole, bad teachers and data one-line errors."""
import json

import pytest
import torch

from twinfold.models import BiEncoder
from twinfold.train import score as score_module
from twinfold.train.score import main

ROWS = [{"anchor": "yeast cells divide", "positive": "Budding yeast divides by mitosis.", "negative_1": "Stock prices.",
         "negative_2": "Rain in Spain.", "id": 7},
        {"anchor": "aspirin and blood", "positive": "Aspirin thins the blood.", "negative_1": "Budding yeast divides.",
         "negative_2": "Stock prices.", "id": 8}]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cross_encoder_scores_are_sentence_transformers_logits_and_rows_stay_whole(tmp_path, cross_encoder_path):
    from sentence_transformers import CrossEncoder

    data, out = write_rows(tmp_path / "d.jsonl", ROWS), tmp_path / "scored.jsonl"
    assert main(["--teacher", str(cross_encoder_path), "--data", str(data), "--out", str(out)]) == 0
    scored = read_rows(out)
    assert [{k: v for k, v in r.items() if not k.startswith("score_")} for r in scored] == ROWS
    reference = CrossEncoder(str(cross_encoder_path), device="cpu", activation_fn=torch.nn.Identity())
    for row in scored:
        expected = reference.predict([(row["anchor"], row[c]) for c in ("positive", "negative_1", "negative_2")])
        got = [row["score_positive"], row["score_negative_1"], row["score_negative_2"]]
        assert got == pytest.approx(expected.tolist(), abs=1e-5)
    provenance = json.loads((tmp_path / "scored.jsonl.provenance.json").read_text())
    assert provenance["kind"] == "cross-encoder" and provenance["rows"] == 2
    assert provenance["columns"] == {"anchor": "anchor", "positive": "positive", "negative_1": "negative",
                                     "negative_2": "negative"}
    st_folder = tmp_path / "st-cross-encoder"  # a sentence-transformers CrossEncoder folder scores alike
    reference.save(str(st_folder))
    assert main(["--teacher", str(st_folder), "--data", str(data), "--out", str(tmp_path / "st.jsonl")]) == 0
    assert [r["score_positive"] for r in read_rows(tmp_path / "st.jsonl")] == \
        pytest.approx([r["score_positive"] for r in scored], abs=1e-6)


def test_bi_encoder_scores_are_its_cosine_of_query_and_document(tmp_path, tiny_bert_path, monkeypatch):
    monkeypatch.setattr(score_module, "BLOCK_ROWS", 1)  # one row a block: blocks join into one file
    rows = [{"anchor": r["anchor"], "positive": r["positive"], "negative": r["negative_1"]} for r in ROWS]
    data, out = write_rows(tmp_path / "d.jsonl", rows), tmp_path / "scored.jsonl"
    assert main(["--teacher", str(tiny_bert_path), "--teacher-kind", "bi-encoder", "--data", str(data),
                 "--out", str(out)]) == 0
    model = BiEncoder.from_pretrained(tiny_bert_path)
    for row in read_rows(out):
        q = model.encode([row["anchor"]], kind="query", convert_to_tensor=True)[0]
        d = model.encode([row["positive"], row["negative"]], kind="document", convert_to_tensor=True)
        assert [row["score_positive"], row["score_negative_1"]] == pytest.approx(
            torch.nn.functional.cosine_similarity(q[None], d).tolist(), abs=1e-6)
    exported = model.save_pretrained(tmp_path / "bi")  # a twinfold / sentence-transformers folder: found by auto
    assert main(["--teacher", str(exported), "--data", str(data), "--out", str(tmp_path / "auto.jsonl")]) == 0
    assert json.loads((tmp_path / "auto.jsonl.provenance.json").read_text())["kind"] == "bi-encoder"


def test_bad_teachers_and_data_are_one_line_errors_and_write_nothing(tmp_path, tiny_bert_path, cross_encoder_path,
                                                                     capsys):
    data, out = write_rows(tmp_path / "d.jsonl", ROWS), tmp_path / "scored.jsonl"

    def error(*args) -> str:
        assert main(list(map(str, args))) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(lines) == 1 and not out.exists()
        return lines[0]

    assert "neither a cross-encoder" in error("--teacher", tiny_bert_path, "--data", data, "--out", out)
    no_anchor = write_rows(tmp_path / "n.jsonl", [{"query": "q", "positive": "p"}])
    assert error("--teacher", cross_encoder_path, "--data", no_anchor, "--out", out) == \
        f"error: {no_anchor}:1: no 'anchor' field; a pair file to score has anchor, positive and optionally negative " \
        "or negative_1..k (fields: ['positive', 'query'])"
    ragged = write_rows(tmp_path / "r.jsonl", [ROWS[0], {"anchor": "a", "positive": "p"}])
    assert "r.jsonl:2: text fields ['anchor', 'positive'] differ" in error(
        "--teacher", cross_encoder_path, "--data", ragged, "--out", out)
    assert "is the --data file" in error("--teacher", cross_encoder_path, "--data", data, "--out", data, "--overwrite")
    assert error("--teacher", cross_encoder_path, "--data", data, "--out", out, "--batch-size", "0").startswith(
        "error: --batch-size")
