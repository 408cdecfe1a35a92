"""Eval overlap and duplicates in training data: hand-made rows with the real all-MiniLM-L6-v2 (cosines noted),
what each option drops, and the summary that reaches the log and the report."""
from pathlib import Path

import pytest

from tests.builders import pairs_from_texts
from twinfold.models import BiEncoder
from twinfold.train.data.leakage import check_datasets, summary_lines
from twinfold.train.eval.beir import BeirData
from twinfold.train.mine import MemoEncoder

EVAL = BeirData(corpus_ids=["d1", "d2"],
                corpus_texts=["Statins reduce cholesterol levels in adults.", "Unjudged document about bees."],
                query_ids=["q1", "q2"],
                query_texts=["Aspirin reduces the risk of heart attacks.", "Vitamin D deficiency is common in winter."],
                qrels={"q1": {"d1": 1}, "q2": {"d1": 0}}, folder=Path("hand"))

ROWS = [
    ("aspirin  REDUCES the risk of heart attacks.", "Coffee contains caffeine."),  # 0: anchor = q1 (exact)
    ("Aspirin lowers the risk of heart attacks.", "Tea contains antioxidants."),   # 1: anchor ~ q1 (0.989)
    ("What do bees make?", "Statins lower cholesterol levels in adults."),         # 2: positive ~ d1 (0.974)
    ("What do bees make?", "Unjudged document about bees."),                       # 3: d2 is not judged: no overlap
    ("Coffee is bitter.", "Coffee contains caffeine."),                            # 4
    ("coffee is   bitter.", "coffee contains caffeine."),                          # 5: = row 4 (exact)
    ("Coffee is a bitter drink.", "Coffee has caffeine."),                         # 6: ~ row 4 (0.959, 0.960)
    ("Coffee tastes bitter.", "Coffee has caffeine."),                             # 7: anchor 0.940 to row 4: kept
]


@pytest.fixture(scope="module")
def encoder(minilm_path):
    return MemoEncoder(BiEncoder.from_pretrained(minilm_path))


def dataset():
    return pairs_from_texts("hand", [a for a, _ in ROWS], [p for _, p in ROWS], [[] for _ in ROWS])


def test_overlap_and_duplicates_are_counted_with_examples(encoder):
    keep, (report,) = check_datasets([dataset()], encoder, EVAL)
    assert keep == [list(range(8))]  # reported, nothing dropped by default
    overlap, duplicates = report["eval_overlap"], report["duplicates"]
    assert (overlap["exact"], overlap["near"], overlap["rows"]) == (1, 2, [0, 1, 2])
    first, *near = overlap["examples"]
    assert (first["row"], first["role"], first["kind"], first["eval"]) == (0, "anchor", "exact", ("query", "q1"))
    assert [(e["row"], e["role"], e["eval"]) for e in near] == [(1, "anchor", ("query", "q1")),
                                                                 (2, "positive", ("document", "d1"))]
    assert near[0]["cosine"] == pytest.approx(0.989, abs=2e-3) and near[1]["cosine"] == pytest.approx(0.974, abs=2e-3)
    assert (duplicates["exact"], duplicates["near"], duplicates["rows"]) == (1, 1, [5, 6])
    assert [(e["row"], e["duplicate_of"], e["kind"]) for e in duplicates["examples"]] == \
        [(5, 4, "exact"), (6, 4, "near")]
    lines = summary_lines([report])
    assert lines[0] == ("- hand (8 rows): eval overlap 1 exact, 2 near (cosine >= 0.95); duplicates 1 exact, 1 near; "
                        "0 dropped")
    assert "row 0 anchor = eval query q1 (exact): aspirin  REDUCES" in lines[1]


@pytest.mark.parametrize("dedup, drop, kept", [(True, False, [0, 1, 2, 3, 4, 7]), (False, True, [3, 4, 5, 6, 7]),
                                               (True, True, [3, 4, 7])])
def test_options_drop_the_flagged_rows(encoder, dedup, drop, kept):
    keep, (report,) = check_datasets([dataset()], encoder, EVAL, dedup=dedup, drop_eval_overlap=drop)
    assert keep == [kept] and report["dropped"] == 8 - len(kept)


def test_without_eval_data_only_duplicates_are_checked(encoder):
    keep, (report,) = check_datasets([dataset()], encoder, None, dedup=True)
    assert keep == [[0, 1, 2, 3, 4, 7]] and report["eval_overlap"]["rows"] == []


def test_findings_are_cached_by_data_eval_texts_and_model(encoder, tmp_path, caplog):
    first = check_datasets([dataset()], encoder, EVAL, cache_dir=tmp_path)
    with caplog.at_level("INFO", logger="twinfold"):
        again = check_datasets([dataset()], encoder, EVAL, cache_dir=tmp_path)
    assert again == first and "checks read from" in caplog.text and len(list(tmp_path.iterdir())) == 1
    check_datasets([dataset()], encoder, None, cache_dir=tmp_path)  # other eval texts: found anew
    check_datasets([dataset()], encoder, EVAL, near_rows=0, cache_dir=tmp_path)  # exact checks only: anew
    assert len(list(tmp_path.iterdir())) == 3
