"""Hard-negative mining: a hand-computed case (chosen embeddings), then the real all-MiniLM-L6-v2 on SciFact train
claims against a SciFact corpus with judgments, the cache, the config and the command line."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

from tests.builders import pairs_from_texts
from tests.helpers import SMOKE
from twinfold.models import BiEncoder
from twinfold.train.config import ConfigError, DatasetConfig, HardNegativesConfig, load_config
from twinfold.train.data.pairs import load_pairs
from twinfold.train.mine import MemoEncoder, main, mine, mine_dataset, normalize_text

# Unit vectors at chosen cosines with anchor A1 = (1, 0); anchor A2 = (0, 1) scores each with its sine.
COS_A1 = {"P1": 0.8, "P2": 0.5, "D1": 0.9, "D2": 0.7, "D3": 0.4, "P3": 0.2, "D4": 0.1}


def unit(c: float) -> list[float]:
    return [c, math.sqrt(1 - c * c)]


@pytest.fixture
def hand_encoder(tiny_bert_path):
    encoder = MemoEncoder(BiEncoder.from_pretrained(tiny_bert_path))
    encoder.remember(["A1", "A2"], "query", torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    encoder.remember(list(COS_A1), "document", torch.tensor([unit(c) for c in COS_A1.values()]))
    return encoder


# Rows: A1 has two positives (P1, P2); A2 has P3. Sines (A2's scores): D4 .995, P3 .980, D3 .917, P2 .866,
# D2 .714, P1 .600, D1 .436.
PAIRS = pairs_from_texts("hand", ["A1", "A1", "A2"], ["P1", "P2", "P3"], [[], [], []])
CORPUS = ["P1", "P2", "P3", "D1", "D2", "D3", "D4", " d2 "]  # " d2 " is D2 after normalisation: one document


def negatives(mined):
    return {(a, p): n for a, p, n in zip(mined.anchor, mined.positive, mined.negatives)}


def test_hand_computed_ranks_guard_exclusions_and_too_few(hand_encoder):
    # A1 ranks (its positives P1, P2 excluded): D1 .9, D2 .7, D3 .4, P3 .2, D4 .1;
    # A2 (P3 excluded): D4, D3, P2, D2, P1, D1
    settings = HardNegativesConfig(num_negatives=1, range_max=3, max_score_ratio=0.95)
    mined = mine(PAIRS, settings, hand_encoder, CORPUS)
    # row P1: limit .76 drops D1 -> D2; row P2: limit .475 drops D1, D2 -> D3; row P3: limit .931 drops D4 -> D3
    assert negatives(mined) == {("A1", "P1"): ["D2"], ("A1", "P2"): ["D3"], ("A2", "P3"): ["D3"]}
    assert mined.negative_scores[0] == pytest.approx([0.7]) and mined.positive_scores[0] == pytest.approx(0.8)
    assert mined.counts == {"rows_in": 3, "rows_out": 3, "too_few_candidates": 0, "guard_dropped": 1 + 2 + 1,
                            "relevant_excluded": 2 + 1, "documents": 7}

    unguarded = mine(PAIRS, HardNegativesConfig(num_negatives=1, range_max=3, max_score_ratio=None), hand_encoder,
                     CORPUS)
    assert negatives(unguarded) == {("A1", "P1"): ["D1"], ("A1", "P2"): ["D1"], ("A2", "P3"): ["D4"]}

    two = mine(PAIRS, HardNegativesConfig(num_negatives=2, range_max=3), hand_encoder, CORPUS)
    # row P2 keeps only D3 in ranks 0-2 under its guard: dropped
    assert negatives(two) == {("A1", "P1"): ["D2", "D3"], ("A2", "P3"): ["D3", "P2"]}
    assert two.source_rows == [0, 2] and two.counts["too_few_candidates"] == 1

    deeper = mine(PAIRS, HardNegativesConfig(num_negatives=1, range_min=1, range_max=4, max_score_ratio=None),
                  hand_encoder, CORPUS)
    assert negatives(deeper) == {("A1", "P1"): ["D2"], ("A1", "P2"): ["D2"], ("A2", "P3"): ["D3"]}


def test_documents_judged_relevant_are_never_mined_and_do_not_take_a_rank(hand_encoder):
    judged = {normalize_text("A1"): {normalize_text("D2")}}
    mined = mine(PAIRS, HardNegativesConfig(num_negatives=1, range_max=3), hand_encoder, CORPUS, judged)
    # A1 now ranks D1, D3, P3 (D2 judged relevant): row P1 limit .76 -> D3
    assert negatives(mined)[("A1", "P1")] == ["D3"]
    assert mined.counts["relevant_excluded"] == 3 + 1


def test_random_sampling_draws_from_the_eligible_candidates_reproducibly(hand_encoder):
    settings = HardNegativesConfig(num_negatives=2, range_max=5, max_score_ratio=None, sampling="random", seed=3)
    first = mine(PAIRS, settings, hand_encoder, CORPUS)
    assert negatives(first) == negatives(mine(PAIRS, settings, hand_encoder, CORPUS))
    ranked = {"A1": ["D1", "D2", "D3", "P3", "D4"], "A2": ["D4", "D3", "P2", "D2", "P1"]}
    seen = set()
    for seed in range(12):
        for (a, _), negs in negatives(mine(PAIRS, HardNegativesConfig(
                num_negatives=2, range_max=5, max_score_ratio=None, sampling="random", seed=seed),
                hand_encoder, CORPUS)).items():
            assert len(set(negs)) == 2 and set(negs) <= set(ranked[a])
            assert [ranked[a].index(n) for n in negs] == sorted(ranked[a].index(n) for n in negs)  # rank order
            seen.add((a, tuple(negs)))
    assert len(seen) > 4  # not always the top two


def test_bm25_candidates_come_in_bm25_order_and_the_guard_uses_the_model(tiny_bert_path):
    encoder = MemoEncoder(BiEncoder.from_pretrained(tiny_bert_path))
    docs = {"protein folding yeast cells": 0.9,                # the positive
            "protein folding yeast chaperones heat": 0.89,     # BM25 first; above the guard (0.95 x 0.9)
            "yeast genetics": 0.3,                             # BM25 second
            "stock market prices": 0.8}                        # no shared term: never a BM25 candidate
    encoder.remember(["protein folding yeast"], "query", torch.tensor([[1.0, 0.0]]))
    encoder.remember(list(docs), "document", torch.tensor([unit(c) for c in docs.values()]))
    pairs = pairs_from_texts("bm25", ["protein folding yeast"], ["protein folding yeast cells"], [[]])

    def mined(candidates, ratio, k=1):
        settings = HardNegativesConfig(num_negatives=k, range_max=3, max_score_ratio=ratio, candidates=candidates)
        return mine(pairs, settings, encoder, list(docs)).negatives

    assert mined("bm25", None, 2) == [["protein folding yeast chaperones heat", "yeast genetics"]]
    assert mined("dense", None, 2) == [["protein folding yeast chaperones heat", "stock market prices"]]
    assert mined("bm25", 0.95) == [["yeast genetics"]]
    assert mined("dense", 0.95) == [["stock market prices"]]


def _scifact_subset(data_dir: Path, folder: Path, claims: int = 25, others: int = 150) -> Path:
    """A BEIR folder of SciFact train claims that have several relevant abstracts, those abstracts and others;
    and a pair file holding only the first relevant abstract of each claim."""
    src = data_dir / "scifact"
    qrels: dict[str, list[str]] = {}
    with open(src / "qrels" / "train.tsv") as f:
        for qid, doc, _ in list(csv.reader(f, delimiter="\t"))[1:]:
            qrels.setdefault(qid, []).append(doc)
    chosen = [q for q, docs in qrels.items() if len(docs) >= 2][:claims]
    queries = {r["_id"]: r for r in map(json.loads, open(src / "queries.jsonl")) if r["_id"] in chosen}
    relevant = {d for q in chosen for d in qrels[q]}
    corpus = []
    for row in map(json.loads, open(src / "corpus.jsonl")):
        if row["_id"] in relevant or len(corpus) < others:
            corpus.append(row)
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries.values()))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q in chosen for d in qrels[q]))
    text = {r["_id"]: (r.get("title", "") + " " + r["text"]).strip() for r in corpus}
    pairs = folder.parent / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": queries[q]["text"], "positive": text[qrels[q][0]]}) + "\n"
                             for q in chosen))
    return pairs


def test_real_mining_never_keeps_a_judged_document_nor_one_above_the_guard(tmp_path, data_dir, minilm_path):
    beir = tmp_path / "beir"
    pairs = _scifact_subset(data_dir, beir)
    out = tmp_path / "mined.jsonl"
    assert main(["--model", str(minilm_path), "--data", str(pairs), "--out", str(out), "--corpus", str(beir),
                 "--num-negatives", "3", "--range-max", "30", "--no-progress"]) == 0
    provenance = json.loads((tmp_path / "mined.jsonl.provenance.json").read_text())
    model = BiEncoder.from_pretrained(minilm_path)
    assert provenance["fingerprint"] == model.fingerprint() and provenance["settings"]["max_score_ratio"] == 0.95
    mined = load_pairs(DatasetConfig(path=str(out), columns=provenance["columns"]))
    assert len(mined) == provenance["rows_out"] > 0 and all(len(n) == 3 for n in mined.negatives)

    corpus = {r["_id"]: (r.get("title", "") + " " + r["text"]).strip()
              for r in map(json.loads, open(beir / "corpus.jsonl"))}
    query_id = {r["text"]: r["_id"] for r in map(json.loads, open(beir / "queries.jsonl"))}
    judged: dict[str, set[str]] = {}
    for qid, doc, _ in list(csv.reader(open(beir / "qrels" / "train.tsv"), delimiter="\t"))[1:]:
        judged.setdefault(qid, set()).add(corpus[doc])
    anchors = model.encode(mined.anchor, kind="query", convert_to_tensor=True)
    positives = model.encode(mined.positive, convert_to_tensor=True)
    for i, (anchor, negs) in enumerate(zip(mined.anchor, mined.negatives)):
        assert not set(negs) & judged[query_id[anchor]], f"row {i}: a judged relevant abstract was mined"
        scores = model.encode(negs, convert_to_tensor=True) @ anchors[i]
        assert scores.max() <= 0.95 * (anchors[i] @ positives[i]) + 1e-5, f"row {i}: a negative above the guard"
    assert provenance["guard_dropped"] > 0  # the guard had work to do

    # Without the judgments (the same corpus as a plain JSONL file), relevant abstracts do get mined:
    # exclusion by judgment is what kept them out above.
    plain = tmp_path / "plain.jsonl"
    assert main(["--model", str(minilm_path), "--data", str(pairs), "--out", str(plain), "--corpus",
                 str(beir / "corpus.jsonl"), "--num-negatives", "3", "--range-max", "30", "--no-progress"]) == 0
    unjudged = load_pairs(DatasetConfig(path=str(plain), columns=provenance["columns"]))
    assert any(set(n) & judged[query_id[a]] for a, n in zip(unjudged.anchor, unjudged.negatives))


def test_mining_in_a_run_is_cached_by_fingerprint_and_settings(tmp_path, tiny_bert_path, data_dir):
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in open(data_dir / "scifact-train-pairs" / "train.jsonl")][:40]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = DatasetConfig(path=str(pairs), hard_negatives=HardNegativesConfig(max_score_ratio=None, range_max=5))
    encoder = MemoEncoder(BiEncoder.from_pretrained(tiny_bert_path, max_length=32))
    first = mine_dataset(ds, encoder, tmp_path / "cache", "tiny")
    assert first.columns == {"anchor": "anchor", "positive": "positive", "negative": "negative"}
    assert first.name == "pairs" and first.hard_negatives is None
    mtime = Path(first.path).stat().st_mtime_ns
    again = mine_dataset(ds, encoder, tmp_path / "cache", "tiny")
    assert again.path == first.path and Path(first.path).stat().st_mtime_ns == mtime  # read, not mined again
    wider = DatasetConfig(path=str(pairs), hard_negatives=HardNegativesConfig(max_score_ratio=None, range_max=6))
    assert mine_dataset(wider, encoder, tmp_path / "cache", "tiny").path != first.path
    other_model = MemoEncoder(BiEncoder.from_pretrained(tiny_bert_path, max_length=16))
    assert mine_dataset(ds, other_model, tmp_path / "cache", "tiny").path != first.path
    loaded = load_pairs(first)
    assert len(loaded) == 40 and all(len(n) == 1 for n in loaded.negatives)


@pytest.mark.parametrize("setting, message", [
    ("{range_min: 5, range_max: 5}", "range_min 5 and range_max 5"),
    ("{num_negatives: 4, range_max: 3}", "fewer than num_negatives 4"),
    ("{candidates: sparse}", "candidates: 'sparse' is not one of dense, bm25"),
    ("{max_score_ratio: 1.5}", "max_score_ratio: 1.5 must be in (0, 1]"),
    ("{corpus: /no/such/corpus}", "corpus: /no/such/corpus does not exist"),
    ("{num_negative: 2}", "did you mean 'data.train[0].hard_negatives.num_negatives'"),
    ("{teacher: t, teacher_margin: -0.1}", "teacher_margin: -0.1 must not be negative"),
    ("{teacher_margin: 0.1}", "teacher_margin: set without a teacher"),
])
def test_bad_hard_negative_settings_name_the_key(setting, message, data_dir, monkeypatch):
    monkeypatch.setenv("TWINFOLD_DATA", str(data_dir))
    path = data_dir / "scifact-train-pairs" / "train.jsonl"
    with pytest.raises(ConfigError, match="hard_negatives" if "did you" not in message else "unknown") as e:
        load_config(SMOKE, [f"data.train=[{{path: {path}, hard_negatives: {setting}}}]"])
    assert message in str(e.value)


def test_mining_refuses_a_dataset_that_brings_negatives(data_dir, monkeypatch):
    path = data_dir / "climate-fever-pairs" / "all.jsonl"
    with pytest.raises(ConfigError, match=r"data.train\[0\].hard_negatives: the dataset already maps"):
        load_config(SMOKE, [
            f"data.train=[{{path: {path}, columns: {{anchor: anchor, positive: positive, negative: negative}}, "
            "hard_negatives: {}}]"])


def test_cli_errors_are_one_line(tmp_path, tiny_bert_path, data_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(data_dir / "scifact-train-pairs" / "train.jsonl").readlines()[:30]))
    args = ["--model", str(tiny_bert_path), "--data", str(pairs), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert main([*args, "--range-min", "3", "--range-max", "2"]) == 2
    assert "error: options: range_min 3 and range_max 2 must satisfy" in capsys.readouterr().err
    assert main([*args, "--columns", "claim=anchor,abstract=positive"]) == 2
    assert "column 'claim' (mapped to 'anchor') is not in the data" in capsys.readouterr().err
    # a guard at 1% of the positive's score leaves no candidate
    assert main([*args, "--max-score-ratio", "0.01", "--range-max", "3"]) == 2
    assert "error: no row kept" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


def test_out_never_replaces_the_input_nor_a_file_twinfold_did_not_mine(tmp_path, tiny_bert_path, data_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(data_dir / "scifact-train-pairs" / "train.jsonl").readlines()[:30]))
    original = pairs.read_bytes()
    args = ["--model", str(tiny_bert_path), "--data", str(pairs), "--range-max", "5", "--no-guard", "--no-progress"]
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--out", str(pairs), *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: --out: {pairs} is the --data file; a pair file never replaces its input. Choose another --out"]
    assert pairs.read_bytes() == original
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    assert main([*args, "--out", str(notes)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out: {notes} (or notes.jsonl.provenance.json) exists and is not a pair file twinfold wrote; "
        "nothing was changed. Choose another path or pass --overwrite to replace it"]
    assert notes.read_text() == "my notes\n"
    out = tmp_path / "mined.jsonl"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out)]) == 0  # its own, unchanged mined file is replaced
    with open(out, "a") as f:
        f.write('{"anchor": "added", "positive": "by hand", "negative": "later"}\n')
    assert main([*args, "--out", str(out)]) == 2 and "is not a pair file twinfold wrote" in capsys.readouterr().err
    assert main([*args, "--out", str(notes), "--overwrite"]) == 0
    assert len(load_pairs(DatasetConfig(path=str(notes), columns={"anchor": "anchor", "positive": "positive"}))) == 30


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "sub/dir", "..", "a\\b"])
def test_a_dataset_name_that_is_a_path_is_refused_before_mining(tmp_path, tiny_bert_path, data_dir, name):
    ds = DatasetConfig(path=str(data_dir / "scifact-train-pairs" / "train.jsonl"), name=name,
                       hard_negatives=HardNegativesConfig())
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^data\.train\[2\]\.name: .* names the mined pair file in .*; use a plain "
                                          r"name \(no path separators, not '\.' or '\.\.'\)$"):
        mine_dataset(ds, MemoEncoder(BiEncoder.from_pretrained(tiny_bert_path)), run / "mined", "tiny",
                     "data.train[2]")
    assert not any(tmp_path.rglob("*.jsonl")) and not list(Path("/tmp").glob("escaped*"))


# Teacher scores of the pairs the hand case ranks (model guard off, ranks 0-2: A1 D1, D2, D3; A2 D4, D3, P2).
TEACHER = {("A1", "P1"): 1.0, ("A1", "P2"): 0.6, ("A1", "D1"): 0.95, ("A1", "D2"): 0.55, ("A1", "D3"): 0.2,
           ("A2", "P3"): 0.9, ("A2", "D4"): 0.1, ("A2", "D3"): 0.85, ("A2", "P2"): 0.0}


def test_teacher_guard_drops_candidates_scored_within_the_margin_of_the_positive(hand_encoder):
    calls = []

    def teacher(anchors, texts):
        calls.append(len(texts))
        return torch.tensor([TEACHER[(a, t)] for a, t in zip(anchors, texts)])

    settings = HardNegativesConfig(num_negatives=1, range_max=3, max_score_ratio=None, teacher="hand",
                                   teacher_margin=0.1)
    mined = mine(PAIRS, settings, hand_encoder, CORPUS, teacher=teacher)
    # row P1: below 1.0 - 0.1 -> D1 (.95) dropped, D2 kept; row P2: below .5 -> D1 and D2 (.55, above the
    # positive's .6 less the margin) dropped, D3 kept; row P3: below .8 -> D3 (.85) dropped, D4 kept
    assert negatives(mined) == {("A1", "P1"): ["D2"], ("A1", "P2"): ["D3"], ("A2", "P3"): ["D4"]}
    assert mined.counts["teacher_dropped"] == 1 + 2 + 1 and calls == [3 * (1 + 3)]  # every pair in one call
    assert mined.negative_scores[0] == pytest.approx([0.7])  # the mining model's score, as without a teacher


def test_mining_cli_with_a_bi_encoder_teacher_keeps_only_negatives_it_scores_below_the_positive(
        tmp_path, tiny_bert_path, data_dir, capsys):
    from twinfold.train.score import pair_scores

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(data_dir / "scifact-train-pairs" / "train.jsonl").readlines()[:30]))
    teacher = BiEncoder.from_pretrained(tiny_bert_path, max_length=16)  # another model than the miner
    folder = teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "mined.jsonl"
    assert main(["--model", str(tiny_bert_path), "--data", str(pairs), "--out", str(out), "--range-max", "8",
                 "--no-guard", "--no-progress", "--teacher", str(folder), "--teacher-margin", "0.02"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    scores = pair_scores(BiEncoder.from_pretrained(folder), [r["anchor"] for r in rows for _ in (0, 1)],
                         [r[c] for r in rows for c in ("positive", "negative")], 32).view(-1, 2)
    assert rows and bool((scores[:, 1] < scores[:, 0] - 0.02).all())
    provenance = json.loads((tmp_path / "mined.jsonl.provenance.json").read_text())
    assert provenance["teacher_fingerprint"] == BiEncoder.from_pretrained(folder).fingerprint()
    assert provenance["settings"]["teacher_margin"] == 0.02 and provenance["teacher_dropped"] > 0
    assert main(["--model", str(tiny_bert_path), "--data", str(pairs), "--out", str(tmp_path / "no.jsonl"),
                 "--teacher", str(tiny_bert_path)]) == 2  # a plain encoder folder: not a teacher
    err = capsys.readouterr().err
    assert f"error: --teacher {tiny_bert_path}: neither a cross-encoder" in err and "--teacher-kind bi-encoder" in err
    assert not (tmp_path / "no.jsonl").exists()


def test_mining_in_a_run_with_a_teacher_is_cached_apart_and_records_it(tmp_path, tiny_bert_path, data_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(data_dir / "scifact-train-pairs" / "train.jsonl").readlines()[:20]))
    teacher = BiEncoder.from_pretrained(tiny_bert_path, max_length=16).save_pretrained(tmp_path / "teacher")
    encoder = MemoEncoder(BiEncoder.from_pretrained(tiny_bert_path, max_length=32))
    plain = mine_dataset(DatasetConfig(path=str(pairs), hard_negatives=HardNegativesConfig(
        max_score_ratio=None, range_max=8)), encoder, tmp_path / "cache", "tiny")
    guarded = mine_dataset(DatasetConfig(path=str(pairs), hard_negatives=HardNegativesConfig(
        max_score_ratio=None, range_max=8, teacher=str(teacher))), encoder, tmp_path / "cache", "tiny")
    assert guarded.path != plain.path
    provenance = json.loads(Path(f"{guarded.path}.provenance.json").read_text())
    assert provenance["teacher_fingerprint"] == BiEncoder.from_pretrained(teacher).fingerprint()
    assert provenance["settings"]["teacher"] == str(teacher) and "teacher_dropped" in provenance
    assert "teacher" not in json.loads(Path(f"{plain.path}.provenance.json").read_text())["settings"]
