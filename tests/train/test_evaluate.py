"""The retrieval evaluator: a hand-made BEIR folder with hand-computed metrics, then the real MiniLM on
SciFact-nano against pytrec_eval, the report files, STS and the command line."""
import json
import math

import numpy as np
import pytest
import torch

from twinfold.models import BiEncoder
from twinfold.train.eval.beir import load_beir
from twinfold.train.eval.metrics import METRICS, rank
from twinfold.train.eval.report import write_report
from twinfold.train.evaluate import RetrievalEvaluator, load_sts, main, sts_spearman

# Six documents (one has the id of query q3), four queries (q4 unjudged), graded judgments.
CORPUS_IDS = ["d1", "d2", "d3", "d4", "d5", "q3"]
QRELS = {"q1": {"d1": 2, "d3": 1, "d5": 0}, "q2": {"d4": 1}, "q3": {"d2": 2, "d3": 1}}
# With the identity as corpus embeddings, query row i scores document j with QUERY_SCORES[i][j].
QUERY_SCORES = [
    [0.1, 0.9, 0.8, 0.3, 0.7, 0.2],  # q1 ranks d2 d3 d5 d4 q3 d1
    [0.1, 0.2, 0.3, 0.9, 0.4, 0.5],  # q2 ranks d4 first
    [0.4, 0.5, 0.3, 0.1, 0.2, 1.0],  # q3 ranks itself first, then d2 d1 d3 d5 d4
]


@pytest.fixture
def hand_folder(tmp_path):
    folder = tmp_path / "hand"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": f"title {d}", "text": f"text of {d}"}) + "\n" for d in CORPUS_IDS))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q, "text": f"question {q}"}) + "\n" for q in ["q1", "q2", "q3", "q4"]))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{g}\n" for q, judged in QRELS.items() for d, g in judged.items()))
    return folder


def _fixed_rows(folder, ignore_identical_ids, out_dir=None, precisions=("float32",)):
    data = load_beir(folder, ignore_identical_ids=ignore_identical_ids)
    evaluator = RetrievalEvaluator(data, precisions=precisions, k_values=(1, 3, 5), out_dir=out_dir)
    return evaluator.score_embeddings(torch.tensor(QUERY_SCORES), torch.eye(6), "fixed", normalize=False,
                                       similarity="dot")


def _mean(*values):
    return sum(values) / len(values)


def test_hand_computed_metrics_with_graded_relevance_and_ignore_identical_ids(hand_folder):
    (row,) = _fixed_rows(hand_folder, ignore_identical_ids=True)
    log2 = math.log2
    idcg_2_1 = 2 + 1 / log2(3)  # q1 and q3: one grade-2 and one grade-1 document
    # q1: d2 (unjudged) d3 (1) d5 (0) d4 q3 d1 (2);  q2: d4 (1) first;  q3 without itself: d2 (2) d1 d3 (1)
    expected = {
        "ndcg@1": _mean(0, 1, 1),
        "ndcg@3": _mean((1 / log2(3)) / idcg_2_1, 1, (2 + 1 / log2(4)) / idcg_2_1),
        "ndcg@10": _mean((1 / log2(3) + 2 / log2(7)) / idcg_2_1, 1, (2 + 1 / log2(4)) / idcg_2_1),
        "mrr@1": _mean(0, 1, 1),
        "mrr@3": _mean(1 / 2, 1, 1),
        "recall@1": _mean(0, 1, 1 / 2),
        "recall@3": _mean(1 / 2, 1, 1),
        "recall@5": _mean(1 / 2, 1, 1),
        "recall@10": _mean(1, 1, 1),
        "map@1": _mean(0, 1, 1 / 2),
        "map@3": _mean((1 / 2) / 2, 1, (1 + 2 / 3) / 2),
        "map@100": _mean((1 / 2 + 2 / 6) / 2, 1, (1 + 2 / 3) / 2),
        "precision@1": _mean(0, 1, 1),
        "precision@3": _mean(1 / 3, 1 / 3, 2 / 3),
        "precision@5": _mean(1 / 5, 1 / 5, 2 / 5),
        "precision@10": _mean(2 / 10, 1 / 10, 2 / 10),
    }
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, abs=1e-7), name
    assert {f"{m}@{k}" for m in METRICS for k in (1, 3, 5, 10, 100)} <= set(row)
    assert (row["model"], row["dim"], row["precision"], row["bytes_per_doc"]) == ("fixed", 6, "float32", 24)


def test_without_ignore_identical_ids_the_query_finds_itself_first(hand_folder):
    (row,) = _fixed_rows(hand_folder, ignore_identical_ids=False)
    # only q3 changes: q3 (unjudged) d2 (2) d1 d3 (1)
    assert row["mrr@1"] == pytest.approx(_mean(0, 1, 0))
    assert row["mrr@3"] == pytest.approx(_mean(1 / 2, 1, 1 / 2))
    assert row["ndcg@3"] == pytest.approx(_mean((1 / math.log2(3)) / (2 + 1 / math.log2(3)), 1,
                                                (2 / math.log2(3)) / (2 + 1 / math.log2(3))))


def test_trec_runs_skip_the_self_hit_and_every_precision_has_its_storage(hand_folder, tmp_path):
    rows = _fixed_rows(hand_folder, True, tmp_path / "out", precisions=("float32", "int8", "binary"))
    assert [(r["precision"], r["bytes_per_doc"], r["storage_mb_per_million_docs"]) for r in rows] == [
        ("float32", 24, 24), ("int8", 6, 6), ("binary", 1, 1)]
    assert rows[1]["ndcg@10"] == pytest.approx(rows[0]["ndcg@10"])  # int8 keeps this ranking
    lines = (tmp_path / "out" / "runs" / "fixed.6.float32.trec").read_text().splitlines()
    q3 = [line.split() for line in lines if line.startswith("q3 ")]
    assert [fields[2] for fields in q3] == ["d2", "d1", "d3", "d5", "d4"]
    assert [fields[3] for fields in q3] == ["1", "2", "3", "4", "5"]
    assert {line.split()[0] for line in lines} == {"q1", "q2", "q3"}  # q4 has no judgment


def test_dims_beyond_the_model_are_an_error(hand_folder):
    evaluator = RetrievalEvaluator(load_beir(hand_folder), dims=[8])
    with pytest.raises(ValueError, match=r"dims \[8\] exceed the model's dimension 6"):
        evaluator.score_embeddings(torch.tensor(QUERY_SCORES), torch.eye(6), "fixed")
    with pytest.raises(ValueError, match="unknown precision int4"):
        RetrievalEvaluator(load_beir(hand_folder), precisions=["int4"])


def test_sts_reads_quotes_verbatim_and_correlates_cosine_with_gold(tmp_path):
    tsv = tmp_path / "sts.tsv"
    tsv.write_text('sentence1\tsentence2\tscore\nA "quoted" cat.\tA cat.\t5.0\nA "quoted" cat.\tA dog.\t3\n'
                   "A cat.\tStocks fell.\t0.5\n")
    sts = load_sts(tsv)
    assert sts["sentences"] == ['A "quoted" cat.', "A cat.", "A dog.", "Stocks fell."]
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 1.0], [-1.0, 0.0]])
    # cosines 0.995, 0.707, -0.995 follow the gold order 5, 3, 0.5
    assert sts_spearman(embeddings, sts) == pytest.approx(1.0)
    tsv.write_text("sentence1\tsentence2\tscore\na\tb\tnone\n")
    with pytest.raises(ValueError, match=r"sts.tsv:2: field 'score' is 'none', not a number"):
        load_sts(tsv)
    tsv.write_text("s1\ts2\tscore\na\tb\t1\n")
    with pytest.raises(ValueError, match=r"sts.tsv:1: header lacks column\(s\) sentence1, sentence2"):
        load_sts(tsv)


def test_report_files(tmp_path, hand_folder):
    rows = _fixed_rows(hand_folder, True, precisions=("float32", "int8", "binary"))
    rows.append({**rows[0], "model": "bm25", "dim": None, "precision": "sparse"})
    paths = write_report(rows, tmp_path, {"data": str(hand_folder), "split": "test", "queries": 3, "documents": 6})
    report = json.loads(paths["json"].read_text())
    assert [(r["model"], r["precision"]) for r in report["results"]] == [
        ("fixed", "float32"), ("fixed", "int8"), ("fixed", "binary"), ("bm25", "sparse")]
    table = paths["md"].read_text()
    assert "| model | dim | precision | nDCG@10 | MRR@10 | R@10 | R@100 | MAP@100 | kept |" in table
    assert "| fixed | 6 | float32 | **" in table and "| bm25 | – | sparse |" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the real model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nano(data_dir, minilm_path, tmp_path_factory):
    """MiniLM on SciFact-nano at 384 and 128 dims, every precision, BM25 and 100 STS-B pairs, encoded once.

    Texts are cut at 128 tokens (the model's 256 halves the test's time); the SciFact test below uses 256.
    """
    out = tmp_path_factory.mktemp("nano-eval")
    sts = out / "sts.tsv"
    sts.write_text("".join((data_dir / "stsb" / "test.tsv").read_text().splitlines(keepends=True)[:101]))
    evaluator = RetrievalEvaluator(load_beir(data_dir / "scifact-nano"), dims=[384, 128],
                                   precisions=["float32", "int8", "binary"], sts=sts, out_dir=out)
    model = BiEncoder.from_pretrained(minilm_path, max_length=128)
    rows = evaluator(model, "minilm") + evaluator.bm25_rows()
    return {"evaluator": evaluator, "model": model, "rows": rows, "out": out}


def _assert_equal_to_pytrec_eval(row, run_file, qrels):
    """Every metric of `row` equals pytrec_eval (trec_eval) on the TREC run the evaluator wrote (to 1e-6)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run = {}
    for line in run_file.read_text().splitlines():
        qid, _, doc_id, _, score, _ = line.split()
        run.setdefault(qid, {})[doc_id] = float(score)
    assert set(run) == set(qrels)
    cuts = "1,3,5,10,100"
    per_query = pytrec_eval.RelevanceEvaluator(
        qrels, {f"ndcg_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}", f"map_cut.{cuts}"}).evaluate(run)
    for k in (1, 3, 5, 10, 100):
        for ours, theirs in {"ndcg": "ndcg_cut", "recall": "recall", "precision": "P", "map": "map_cut"}.items():
            want = np.mean([v[f"{theirs}_{k}"] for v in per_query.values()])
            assert row[f"{ours}@{k}"] == pytest.approx(want, abs=1e-6), (run_file.name, ours, k)
        cut = {q: {d: hits[d] for d in rank(hits)[:k]} for q, hits in run.items()}  # trec_eval's order
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        assert row[f"mrr@{k}"] == pytest.approx(np.mean([v["recip_rank"] for v in rr.values()]), abs=1e-6)


def _run_file(out, row):
    tag = f"{row['dim']}.{row['precision']}" if row["dim"] else row["precision"]
    return out / "runs" / f"{row['model']}.{tag}.trec"


def test_minilm_on_scifact_nano_every_metric_equals_pytrec_eval(nano):
    for row in nano["rows"]:
        _assert_equal_to_pytrec_eval(row, _run_file(nano["out"], row), nano["evaluator"].data.qrels)


def test_minilm_on_scifact_nano_values(nano):
    by = {(r["model"], r["dim"], r["precision"]): r for r in nano["rows"]}
    assert set(by) == {("minilm", d, p) for d in (384, 128) for p in ("float32", "int8", "binary")} | {
        ("bm25", None, "sparse")}
    assert by["minilm", 384, "float32"]["ndcg@10"] == pytest.approx(0.779, abs=0.005)  # measured, 128 tokens
    assert by["bm25", None, "sparse"]["ndcg@10"] == pytest.approx(0.83, abs=0.01)  # shared data README
    assert by["minilm", 384, "int8"]["ndcg@10"] == pytest.approx(by["minilm", 384, "float32"]["ndcg@10"], abs=0.01)
    assert 0.85 * by["minilm", 384, "float32"]["ndcg@10"] < by["minilm", 384, "binary"]["ndcg@10"]
    assert by["minilm", 128, "float32"]["ndcg@10"] < by["minilm", 384, "float32"]["ndcg@10"]
    assert [by["minilm", 384, p]["bytes_per_doc"] for p in ("float32", "int8", "binary")] == [1536, 384, 48]
    assert 0.7 < by["minilm", 384, "float32"]["sts_spearman"] < 0.95
    assert "sts_spearman" not in by["minilm", 384, "int8"]
    assert by["minilm", 384, "float32"]["fingerprint"] == nano["model"].fingerprint()


def test_the_same_model_is_not_encoded_twice(nano, monkeypatch):
    calls = []
    model = nano["model"]
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **kw: calls.append(a) or real_encode(*a, **kw))
    again = nano["evaluator"](model, "minilm")
    assert calls == []
    assert again == [r for r in nano["rows"] if r["model"] == "minilm"]


@pytest.mark.slow
def test_minilm_on_scifact_test_gives_the_published_ndcg_and_bm25_about_066(data_dir, minilm_path, tmp_path):
    evaluator = RetrievalEvaluator(load_beir(data_dir / "scifact"), out_dir=tmp_path)
    (row,) = evaluator(BiEncoder.from_pretrained(minilm_path), "minilm")
    assert row["dim"] == 384 and row["ndcg@10"] == pytest.approx(0.645, abs=0.002)  # MTEB/BEIR published value
    _assert_equal_to_pytrec_eval(row, _run_file(tmp_path, row), evaluator.data.qrels)
    (bm25,) = evaluator.bm25_rows()
    assert bm25["ndcg@10"] == pytest.approx(0.66, abs=0.01)  # shared data README; BEIR publishes 0.665
    _assert_equal_to_pytrec_eval(bm25, _run_file(tmp_path, bm25), evaluator.data.qrels)


# --- the command line -----------------------------------------------------------------------------------
def test_command_line_writes_the_report(hand_folder, tiny_bert_path, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["--model", str(tiny_bert_path), "--data", str(hand_folder), "--dims", "128,64",
                 "--precision", "float32,int8,binary", "--bm25", "--ignore-identical-ids", "--k", "1,5",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["results"]) == 7 and report["info"]["ignore_identical_ids"] is True
    assert {"ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100", "precision@5", "bytes_per_doc"} <= set(
        report["results"][0])
    assert (out / "report.md").exists() and (out / "ndcg_vs_dim.png").exists()
    assert len(list((out / "runs").glob("*.trec"))) == 7
    assert "| bm25 | – | sparse |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--data", "{missing}"], "not a folder"),
    (["--data", "{hand}", "--dims", "256"], "exceed the model's dimension 128"),
    (["--data", "{hand}", "--split", "dev"], "qrels/dev.tsv: not found"),
    (["--data", "{hand}", "--sts", "{missing}"], "STS file not found"),
    (["--data", "{hand}", "--batch-size", "0"], "--batch-size: 0 must be a positive integer"),
])
def test_command_line_errors_are_one_line_with_exit_code_2(args, message, hand_folder, tiny_bert_path, tmp_path,
                                                           capsys):
    args = [a.format(missing=tmp_path / "missing", hand=hand_folder) for a in args]
    assert main(["--model", str(tiny_bert_path), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_overwrite_never_writes_the_report_through_a_link(hand_folder, tiny_bert_path, tmp_path, capsys):
    mine = tmp_path / "my-notes.md"
    mine.write_text("a user's file")
    out = tmp_path / "report"
    out.mkdir()
    (out / "other.txt").write_text("replaced only with --overwrite")
    (out / "report.md").symlink_to(mine)
    code = main(["--model", str(tiny_bert_path), "--data", str(hand_folder), "--dims", "128", "--out", str(out),
                 "--overwrite", "--no-progress"])
    assert code == 2 and mine.read_text() == "a user's file"
    assert f"{out / 'report.md'} is a symbolic link" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["float32", "int8", "binary"])
def test_a_corpus_embedded_beforehand_scores_as_encoding_it_does(hand_folder, tiny_bert_path, tmp_path, capsys,
                                                                 precision):
    """`--corpus-embeddings DATASET` (parts of 4 documents, searched one by one) gives the rows that encoding the
    corpus gives: int8 calibrated on every document, binary rescored alike."""
    from twinfold.models.encode import main as encode_main

    data = load_beir(hand_folder)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                            for i, t in zip(data.corpus_ids, data.corpus_texts)))
    assert encode_main(["--model", str(tiny_bert_path), "--input", str(docs), "--output", str(tmp_path / "ds"),
                        "--format", "parquet", "--part-rows", "4", "--precision", precision, "--dim", "64",
                        "--no-progress"]) == 0
    common = ["--model", str(tiny_bert_path), "--data", str(hand_folder), "--k", "1,3", "--no-progress"]
    capsys.readouterr()
    assert main([*common, "--precision", precision, "--dims", "64"]) == 0
    encoded = capsys.readouterr().out
    assert main([*common, "--precision", precision, "--dims", "64", "--corpus-embeddings", str(tmp_path / "ds")]) == 0
    assert capsys.readouterr().out == encoded
    if precision != "float32":
        assert main([*common, "--corpus-embeddings", str(tmp_path / "ds")]) == 2
        assert f"error: --precision: the corpus embeddings are {precision}; evaluate them with --precision " \
            f"{precision}" in capsys.readouterr().err
