"""Retrieval metrics: a hand-computed case, then parity with pytrec_eval (trec_eval), then edge cases."""
import math
import random

import pytest

from twinfold.train.eval.metrics import METRICS, evaluate_run, rank, spearman, write_trec_run

K_VALUES = (1, 2, 3, 5, 10, 20)


def test_hand_computed_graded_query():
    # ranking d2 (grade 0), d3 (grade 1), d5 (unjudged), d1 (grade 2); nothing else relevant
    run = {"q": {"d2": 0.9, "d3": 0.8, "d5": 0.7, "d1": 0.1}}
    qrels = {"q": {"d1": 2, "d2": 0, "d3": 1}}
    m = evaluate_run(run, qrels, k_values=(1, 3, 10))
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@1"] == 0
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3)) / idcg)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 2 / math.log2(5)) / idcg)
    assert (m["mrr@1"], m["mrr@3"]) == (0, 1 / 2)
    assert (m["recall@1"], m["recall@3"], m["recall@10"]) == (0, 1 / 2, 1)
    assert m["map@3"] == pytest.approx((1 / 2) / 2)
    assert m["map@10"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert (m["precision@1"], m["precision@3"], m["precision@10"]) == (0, 1 / 3, 2 / 10)


def test_mean_counts_a_query_missing_from_the_run_as_zero():
    qrels = {"a": {"d1": 1}, "b": {"d2": 1}}
    m = evaluate_run({"a": {"d1": 1.0}}, qrels, k_values=(10,))
    assert m["ndcg@10"] == m["recall@10"] == 1 / 2


def test_ties_rank_by_document_id_descending_like_trec_eval():
    assert rank({"a": 1.0, "c": 1.0, "b": 2.0, "d": 0.5}) == ["b", "c", "a", "d"]


def _random_case(seed: int, n_queries: int = 40, n_docs: int = 60):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_queries):
        judged = rng.sample(docs, rng.randint(1, 12))
        qrels[f"q{q}"] = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in judged}
        # scores rounded to 1 decimal: many ties, which trec_eval breaks by document id
        run[f"q{q}"] = {d: round(rng.random(), 1) for d in rng.sample(docs, rng.randint(5, 40))}
    qrels["only-grade-0"] = {"d1": 0, "d2": 0}
    run["only-grade-0"] = {"d1": 0.5, "d3": 0.4}
    return run, qrels


def _pytrec(run, qrels, k_values):
    """pytrec_eval means for our metric names; MRR@k is recip_rank on the run cut at k in trec_eval's order."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    cuts = ",".join(map(str, k_values))
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}",
                                                       f"map_cut.{cuts}"})
    per_query = evaluator.evaluate(run)
    means = {}
    for k in k_values:
        for ours, theirs in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P"), ("map", "map_cut")):
            means[f"{ours}@{k}"] = sum(v[f"{theirs}_{k}"] for v in per_query.values()) / len(per_query)
        cut = {q: {d: s[d] for d in rank(s)[:k]} for q, s in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        means[f"mrr@{k}"] = sum(v["recip_rank"] for v in rr.values()) / len(rr)
    return means


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_pytrec_eval_on_graded_qrels_with_ties(seed):
    run, qrels = _random_case(seed)
    ours = evaluate_run(run, qrels, K_VALUES)
    theirs = _pytrec(run, qrels, K_VALUES)
    assert set(ours) == {f"{m}@{k}" for m in METRICS for k in K_VALUES}
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name


def test_negative_grades_are_not_relevant_and_have_no_gain_like_trec_eval():
    run = {"q": {"a": 1.0, "b": 3.0, "c": 0.5, "d": 2.0}}
    qrels = {"q": {"a": 2, "b": -1, "c": 1}}
    ours, theirs = evaluate_run(run, qrels, (1, 3, 10)), _pytrec(run, qrels, (1, 3, 10))
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_empty_qrels_is_an_error():
    with pytest.raises(ValueError, match="no judged query"):
        evaluate_run({"q": {"d": 1.0}}, {})


def test_spearman_hand_computed_with_ties():
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 -> centred products 4.5 over sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_trec_run_file_is_ranked_and_round_trips_scores(tmp_path):
    run = {"q1": {"a": 0.5, "b": 0.25, "c": 0.5}, "q2": {"x": 1 / 3}}
    write_trec_run(tmp_path / "run.trec", run, "tag")
    lines = [line.split() for line in (tmp_path / "run.trec").read_text().splitlines()]
    assert [(q, d, r) for q, _, d, r, _, _ in lines] == [("q1", "c", "1"), ("q1", "a", "2"), ("q1", "b", "3"),
                                                          ("q2", "x", "1")]
    assert {(q, d): float(s) for q, _, d, _, s, _ in lines} == {(q, d): s for q in run for d, s in run[q].items()}
    assert all(line[1] == "Q0" and line[5] == "tag" for line in lines)
    with pytest.raises(ValueError, match="one word"):
        write_trec_run(tmp_path / "bad.trec", run, "two words")
