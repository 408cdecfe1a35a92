"""Retrieval metrics with trec_eval's definitions (nDCG, MRR, recall, MAP, precision at k) and TREC run files.

A run maps query id -> document id -> score; qrels map query id -> document id -> integer grade. A run is
ranked as trec_eval ranks it: score descending, ties by document id descending. A grade > 0 is relevant
and is the gain in nDCG; grades <= 0 count as not relevant. Means are over every judged query, so a
query the run misses counts as zero.
"""
import math
from pathlib import Path

import numpy as np

from twinfold.models.files.atomic import atomic_write_bytes

METRICS = ("ndcg", "mrr", "recall", "map", "precision")
DEFAULT_K_VALUES = (1, 3, 5, 10, 100)


def metric_names(k_values=DEFAULT_K_VALUES) -> list[str]:
    """Every `metric@k` that `evaluate_run` reports for `k_values`."""
    return [f"{m}@{k}" for m in METRICS for k in k_values]


def rank(scores: dict[str, float]) -> list[str]:
    """Document ids in trec_eval's order: score descending, then document id descending."""
    by_id = sorted(scores, reverse=True)
    return sorted(by_id, key=lambda doc_id: -scores[doc_id])


def query_metrics(ranking: list[str], judged: dict[str, int], k_values) -> dict[str, float]:
    """Every metric of METRICS at every k for one query's ranked document ids."""
    gains = [max(judged.get(doc_id, 0), 0) for doc_id in ranking]
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    num_relevant = len(ideal)
    out = {}
    for k in k_values:
        top = gains[:k]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(top) if g)
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        hits = [i for i, g in enumerate(top) if g]
        out[f"ndcg@{k}"] = dcg / idcg if idcg else 0.0
        out[f"mrr@{k}"] = 1 / (hits[0] + 1) if hits else 0.0
        out[f"recall@{k}"] = len(hits) / num_relevant if num_relevant else 0.0
        out[f"map@{k}"] = sum((j + 1) / (i + 1) for j, i in enumerate(hits)) / num_relevant if num_relevant else 0.0
        out[f"precision@{k}"] = len(hits) / k
    return out


def evaluate_run(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]],
                 k_values=DEFAULT_K_VALUES) -> dict[str, float]:
    """Mean of every metric over the judged queries (the keys of `qrels`)."""
    if not qrels:
        raise ValueError("qrels hold no judged query, so there is nothing to average")
    totals = dict.fromkeys((f"{m}@{k}" for m in METRICS for k in k_values), 0.0)
    for qid, judged in qrels.items():
        for name, value in query_metrics(rank(run.get(qid, {})), judged, k_values).items():
            totals[name] += value
    return {name: total / len(qrels) for name, total in totals.items()}


def spearman(x, y) -> float:
    """Spearman's rank correlation: the Pearson correlation of ranks, tied values sharing their mean rank."""
    rx, ry = _average_ranks(np.asarray(x, dtype=np.float64)), _average_ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator else math.nan


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def write_trec_run(path: str | Path, run: dict[str, dict[str, float]], tag: str) -> None:
    """Write `run` as a TREC run file: `qid Q0 docid rank score tag`, ranks from 1 in trec_eval's order."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"a TREC run tag must be one word, got {tag!r}")
    lines = [f"{qid} Q0 {doc_id} {r} {float(scores[doc_id])!r} {tag}\n"
             for qid, scores in run.items() for r, doc_id in enumerate(rank(scores), 1)]
    atomic_write_bytes(path, "".join(lines).encode())
