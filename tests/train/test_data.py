"""train.data and train.sampler: roles by name, validation with file:line:field, no-duplicate batches."""
import json

import pytest

from train.config import DatasetConfig
from train.data import DataError, PairDataset, load_pairs
from train.sampler import BatchPlan


def jsonl(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_columns_map_to_roles_by_name_not_order(tmp_path):
    path = jsonl(tmp_path, [{"doc": "d1", "extra": 1, "query": "q1", "hard": "n1"},
                            {"doc": "d2", "extra": 2, "query": "q2", "hard": "n2"}])
    ds = load_pairs(DatasetConfig(path=str(path), columns={"query": "anchor", "doc": "positive", "hard": "negative"}))
    assert (ds.anchor, ds.positive, ds.negatives) == (["q1", "q2"], ["d1", "d2"], [["n1"], ["n2"]])


def test_csv_and_default_role_names(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("positive,anchor\np1,a1\np2,a2\n")
    ds = load_pairs(DatasetConfig(path=str(path)))
    assert ds.anchor == ["a1", "a2"] and ds.positive == ["p1", "p2"] and ds.negatives == [[], []]


def test_real_scifact_pairs(data_dir):
    ds = load_pairs(DatasetConfig(path=str(data_dir / "scifact-train-pairs" / "train.jsonl"),
                                  columns={"anchor": "anchor", "positive": "positive"}))
    assert len(ds) == 919 and all(isinstance(t, str) and t for t in ds.anchor + ds.positive)


@pytest.mark.parametrize("rows, columns, message", [
    (['{"a": "x", "p": "y"}', '{"a": "x", "p": '], None, ":2: not valid JSON"),
    ([{"a": "x", "p": "y"}, {"a": "z"}], None, ":2 field 'p': text is missing (null)"),
    ([{"a": "x", "p": "y"}, {"a": "z", "p": "   "}], None, ":2 field 'p': text is empty"),
    ([{"a": "x", "p": 3}], None, ":1 field 'p': text is not a string (int)"),
    ([{"a": "x", "p": "y"}], {"a": "anchor", "pos": "positive"}, "column 'pos' (mapped to 'positive') is not in the data"),
    (['[1, 2]'], None, ":1: expected a JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, columns, message):
    path = jsonl(tmp_path, rows)
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path), columns=columns or {"a": "anchor", "p": "positive"}))
    assert str(path) in str(e.value) and message in str(e.value)


def test_empty_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        load_pairs(DatasetConfig(path=str(empty), columns={"a": "anchor", "p": "positive"}))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"a": "x", "p": "y"}\n{"a": "caf\xe9", "p": "y"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_pairs(DatasetConfig(path=str(bad), columns={"a": "anchor", "p": "positive"}))


def pairs(n, duplicate_every=0):
    anchor = [f"q{i}" for i in range(n)]
    positive = [f"d{i % duplicate_every}" if duplicate_every else f"d{i}" for i in range(n)]
    return PairDataset("toy", anchor, positive, [[] for _ in range(n)])


def test_batches_never_repeat_a_text_and_are_deterministic():
    ds = pairs(40, duplicate_every=10)  # every positive appears 4 times
    plan = BatchPlan([ds], batch_size=8, seed=1)
    batches = plan.epoch(0)
    assert batches and all(len(b.rows) == 8 for b in batches)
    for b in batches:
        texts = [t for i in b.rows for t in ds.texts(i)]
        assert len(texts) == len(set(texts))
    assert BatchPlan([ds], 8, seed=1).epoch(0) == batches
    assert BatchPlan([ds], 8, seed=1).epoch(1) != batches


def test_shards_partition_the_global_batch():
    plan = BatchPlan([pairs(32)], batch_size=8, seed=0)
    batch = plan.epoch(0)[0]
    shards = [batch.shard(r, 2) for r in range(2)]
    assert shards[0] + shards[1] == batch.rows and len(shards[0]) == 4


def test_mixing_keeps_one_dataset_per_batch_and_weights():
    a, b = pairs(32), PairDataset("b", [f"x{i}" for i in range(16)], [f"y{i}" for i in range(16)], [[]] * 16, 2.0)
    plan = BatchPlan([a, b], batch_size=8, seed=0, mixing="round_robin")
    datasets = [batch.dataset for batch in plan.epoch(0)]
    assert datasets.count(0) == 4 and datasets.count(1) == 4  # b: weight 2 x 2 full batches
    assert datasets[:2] in ([0, 1], [1, 0])


def test_dataset_smaller_than_a_batch_or_all_duplicates():
    with pytest.raises(DataError, match="4 rows, fewer than one batch of 8"):
        BatchPlan([pairs(4)], batch_size=8, seed=0)
    with pytest.raises(DataError, match="mostly duplicates"):
        BatchPlan([pairs(16, duplicate_every=2)], batch_size=8, seed=0).epoch(0)


def test_csv_with_a_ragged_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("anchor,positive\na1,p1\na2,p2,extra\na3,p3\n")
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path)))
    assert str(path) in str(e.value) and "line 3" in str(e.value)
