"""train.data and train.sampler: roles by name, validation with file:line:field, tokenized once into a cache,
no-duplicate batches that use every row once per epoch."""
import json

import numpy as np
import pytest

from tests.builders import count_truncated, row_keys
from twinfold.models import BiEncoder
from twinfold.train.config import DatasetConfig
from twinfold.train.data.pairs import DataError, load_pairs, tokenize_pairs
from twinfold.train.data.plan import BatchPlan


def jsonl(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_columns_map_to_roles_by_name_not_order(tmp_path):
    path = jsonl(tmp_path, [{"doc": "d1", "extra": 1, "query": "q1", "hard": "n1"},
                            {"doc": "d2", "extra": 2, "query": "q2", "hard": "n2"}])
    ds = load_pairs(DatasetConfig(path=str(path), columns={"query": "anchor", "doc": "positive", "hard": "negative"}))
    assert ds.table.to_dict() == {"anchor": ["q1", "q2"], "positive": ["d1", "d2"], "negative_0": ["n1", "n2"]}
    assert ds.num_negatives == 1 and ds.negatives == [["n1"], ["n2"]]


def test_csv_and_default_role_names(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("positive,anchor\np1,a1\np2,a2\n")
    ds = load_pairs(DatasetConfig(path=str(path)))
    assert ds.table.to_dict() == {"anchor": ["a1", "a2"], "positive": ["p1", "p2"]} and ds.num_negatives == 0


def test_real_scifact_pairs(data_dir):
    ds = load_pairs(DatasetConfig(path=str(data_dir / "scifact-train-pairs" / "train.jsonl"),
                                  columns={"anchor": "anchor", "positive": "positive"}))
    assert len(ds) == 919 and all(isinstance(t, str) and t for t in [*ds.table["anchor"], *ds.table["positive"]])


@pytest.mark.parametrize("rows, columns, message", [
    (['{"a": "x", "p": "y"}', '{"a": "x", "p": '], None, ":2: not valid JSON"),
    ([{"a": "x", "p": "y"}, {"a": "z"}], None, ":2 field 'p': text is missing (null)"),
    ([{"a": "x", "p": "y"}, {"a": "z", "p": "   "}], None, ":2 field 'p': text is empty"),
    ([{"a": "x", "p": 3}], None, ":1 field 'p': text is not a string (int)"),
    ([{"a": "x", "p": "y"}], {"a": "anchor", "pos": "positive"},
     "column 'pos' (mapped to 'positive') is not in the data"),
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


def pairs(n, duplicate_every=0, name="toy", weight=1.0):
    anchor = [f"q{i}" for i in range(n)]
    positive = [f"d{i % duplicate_every}" if duplicate_every else f"d{i}" for i in range(n)]
    return row_keys(name, anchor, positive, weight=weight), anchor, positive


def test_batches_never_repeat_a_text_use_every_row_once_and_are_deterministic():
    keys, anchor, positive = pairs(44, duplicate_every=11)  # every positive appears 4 times
    plan = BatchPlan([keys], batch_size=8, seed=1)
    batches = plan.epoch(0)
    assert [len(b.rows) for b in batches] == [8] * 6  # 44 rows: 5 full batches, and 4 rows filled up with 4 more
    assert set(i for b in batches for i in b.rows) == set(range(44))  # every row, 4 of them twice
    for b in batches:
        texts = [t for i in b.rows for t in (anchor[i], positive[i])]
        assert len(texts) == len(set(texts))
    assert BatchPlan([keys], 8, seed=1).epoch(0) == batches
    assert BatchPlan([keys], 8, seed=1).epoch(1) != batches


def test_the_last_batch_is_filled_up_from_the_start_of_the_epoch():
    keys, _, _ = pairs(43)
    batches = BatchPlan([keys], batch_size=8, seed=0).epoch(0)
    assert [len(b.rows) for b in batches] == [8] * 6  # 40 + 3 left over + 5 from the epoch's start
    order = np.random.default_rng([0, 0]).permutation(43).tolist()  # the plan's shuffle of epoch 0
    last = next(b.rows for b in batches if set(b.rows) & set(order[40:]))
    assert last == order[40:] + order[:5] and len(set(last)) == 8


def test_one_pair_batches_never_happen():
    # 16 rows whose positives come in pairs: a no-duplicates plan used to leave a batch of 1 pair ([8, 1, 7])
    keys, _, _ = pairs(16, duplicate_every=9)
    for seed in range(20):
        assert {len(b.rows) for e in range(3) for b in BatchPlan([keys], 8, seed).epoch(e)} == {8}


@pytest.mark.parametrize("batch_size", [16, 32])
def test_scifact_plan_is_whole_batches_every_row_every_epoch_and_split_alike_by_any_process_count(data_dir,
                                                                                                   batch_size):
    rows = [json.loads(line) for line in (data_dir / "scifact-train-pairs" / "train.jsonl").read_text().splitlines()]
    keys = row_keys("scifact", [r["anchor"] for r in rows], [r["positive"] for r in rows])
    for seed in (42, 43):
        plan = BatchPlan([keys], batch_size, seed)
        for epoch in range(2):
            batches = plan.epoch(epoch)
            assert {len(b.rows) for b in batches} == {batch_size}
            assert set(i for b in batches for i in b.rows) == set(range(len(rows)))  # no pair skipped
            for world in (1, 2, 4):  # the processes' shards, in rank order, are the batch
                assert all(sum((b.shard(r, world) for r in range(world)), []) == b.rows for b in batches)
        assert plan.batches_in(2) == len(plan.epoch(0)) + len(plan.epoch(1))


def test_shared_negatives_are_allowed_but_never_equal_an_anchor_or_positive_of_the_batch():
    n = 200
    anchor, positive = [f"q{i}" for i in range(n)], [f"d{i}" for i in range(n)]
    negatives = [[f"shared{i % 10}", positive[(i + 1) % n]] for i in range(n)]  # 10 negatives shared by all rows
    keys = row_keys("shared", anchor, positive, negatives)
    batches = BatchPlan([keys], batch_size=32, seed=0).epoch(0)
    assert set(i for b in batches for i in b.rows) == set(range(n))  # every row
    assert [len(b.rows) for b in batches] == [32] * 7  # 200 rows: the last batch filled up with 24 more
    for b in batches:
        core = {t for i in b.rows for t in (anchor[i], positive[i])}
        assert len(core) == 2 * len(b.rows)
        assert not core.intersection(t for i in b.rows for t in negatives[i])


def test_shards_partition_the_global_batch():
    plan = BatchPlan([pairs(32)[0]], batch_size=8, seed=0)
    batch = plan.epoch(0)[0]
    shards = [batch.shard(r, 2) for r in range(2)]
    assert shards[0] + shards[1] == batch.rows and len(shards[0]) == 4


def test_mixing_keeps_one_dataset_per_batch_and_weights():
    a, b = pairs(32)[0], pairs(16, name="b", weight=2.0)[0]
    plan = BatchPlan([a, b], batch_size=8, seed=0, mixing="round_robin")
    datasets = [batch.dataset for batch in plan.epoch(0)]
    assert datasets.count(0) == 4 and datasets.count(1) == 4  # b: weight 2 x 16 rows
    assert datasets[:2] in ([0, 1], [1, 0])


def test_dataset_smaller_than_a_batch_or_all_duplicates():
    with pytest.raises(DataError, match="4 rows, fewer than one batch of 8"):
        BatchPlan([pairs(4)[0]], batch_size=8, seed=0)
    with pytest.raises(DataError, match="mostly duplicates"):
        BatchPlan([pairs(16, duplicate_every=2)[0]], batch_size=8, seed=0).epoch(0)


def test_tokenized_once_into_a_cache_keyed_by_data_and_tokenizer(tmp_path, tiny_bert_path, caplog):
    rows = [{"a": f"claim {i} " + "word " * (i % 7), "p": f"abstract {i} " + "text " * i, "n": "shared negative"}
            for i in range(12)]
    path = jsonl(tmp_path, rows)
    cfg = DatasetConfig(path=str(path), columns={"a": "anchor", "p": "positive", "n": "negative"})
    model = BiEncoder.from_pretrained(tiny_bert_path, max_length=8, query_prefix="query: ")
    ds = load_pairs(cfg)
    tokens = tokenize_pairs(ds, model.text_tokenizer, tmp_path / "cache")
    picked = tokens.rows([3, 0])
    assert picked["anchor"][0] == model.token_ids([rows[3]["a"], rows[0]["a"]], "query")
    assert picked["positive"][0] == model.token_ids([rows[3]["p"], rows[0]["p"]], "document")
    assert picked["negative"][0] == model.token_ids(["shared negative"] * 2, "document")
    assert tokens.truncated == {"anchor": count_truncated(model, [r["a"] for r in rows], "query"),
                                "positive": count_truncated(model, [r["p"] for r in rows], "document"),
                                "negative_0": 0}
    assert 0 < tokens.truncated["positive"] < 12
    assert tokens.keys("negative").shape == (12, 1) and len(set(tokens.keys("anchor").tolist())) == 12
    folders = list((tmp_path / "cache" / "tokens").iterdir())
    with caplog.at_level("INFO", logger="twinfold"):
        again = tokenize_pairs(load_pairs(cfg), model.text_tokenizer, tmp_path / "cache")
    assert "token cache reused" in caplog.text and again.rows([3, 0]) == picked
    assert list((tmp_path / "cache" / "tokens").iterdir()) == folders
    longer = BiEncoder.from_pretrained(tiny_bert_path, max_length=16, query_prefix="query: ")
    tokenize_pairs(ds, longer.text_tokenizer, tmp_path / "cache")  # another max_length: another cache
    path.write_text(path.read_text().replace("claim 3", "claim three"))  # other content: another cache
    tokenize_pairs(load_pairs(cfg), model.text_tokenizer, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 3


def test_csv_with_a_ragged_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("anchor,positive\na1,p1\na2,p2,extra\na3,p3\n")
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path)))
    assert str(path) in str(e.value) and "line 3" in str(e.value)


def test_the_token_cache_is_keyed_by_the_columns_read(tmp_path, tiny_bert_path):
    path = jsonl(tmp_path, [{"q": f"claim {i}", "doc": f"abstract {i}", "other": f"unrelated text {i}"}
                            for i in range(6)])
    tokenizer = BiEncoder.from_pretrained(tiny_bert_path).text_tokenizer
    first, second = (tokenize_pairs(load_pairs(DatasetConfig(path=str(path), columns={"q": "anchor",
                                                                                      source: "positive"})),
                                    tokenizer, tmp_path / "cache") for source in ("doc", "other"))
    assert first.table["positive_ids"] == tokenizer.ids([f"abstract {i}" for i in range(6)], "document")
    assert second.table["positive_ids"] == tokenizer.ids([f"unrelated text {i}" for i in range(6)], "document")
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2


def test_a_damaged_token_cache_is_rebuilt_with_a_warning(tmp_path, tiny_bert_path, caplog):
    rows = [{"anchor": f"claim number {i}", "positive": f"abstract {i} about cells"} for i in range(8)]
    cfg = DatasetConfig(path=str(jsonl(tmp_path, rows)))
    tokenizer = BiEncoder.from_pretrained(tiny_bert_path).text_tokenizer
    expected = tokenizer.ids([r["anchor"] for r in rows], "query")
    tokenize_pairs(load_pairs(cfg), tokenizer, tmp_path / "cache")
    (folder,) = (tmp_path / "cache" / "tokens").iterdir()
    (arrow,) = folder.glob("*.arrow")
    first_ids = np.array(expected[0], dtype=np.int32).tobytes()
    for damage in ("altered", "truncated"):
        data = arrow.read_bytes()
        if damage == "altered":  # one token id of the first anchor changed: same size, other ids
            at = data.index(first_ids) + 4
            data = data[:at] + np.array([7], dtype=np.int32).tobytes() + data[at + 4:]
        arrow.write_bytes(data if damage == "altered" else data[:len(data) // 2])
        caplog.clear()
        with caplog.at_level("WARNING", logger="twinfold"):
            tokens = tokenize_pairs(load_pairs(cfg), tokenizer, tmp_path / "cache")
        problem = "does not match its checksum" if damage == "altered" else f"has {len(data) // 2} bytes, expected"
        (warning,) = [r.message for r in caplog.records]
        assert warning.startswith(f"pairs: token cache {folder} is damaged ({arrow.name} {problem}")
        assert warning.endswith("); it is rebuilt")
        assert tokens.table["anchor_ids"] == expected
    assert [p.name for p in (tmp_path / "cache" / "tokens").iterdir()] == [folder.name]


def pairs_with_row_2(tmp_path, suffix: str, row: str):
    """A 15-row pair file (`.tsv` or `.csv`) whose row 2 (line 4) is `row`."""
    sep = "\t" if suffix == ".tsv" else ","
    lines = [f"claim {i}{sep}abstract {i}" for i in range(15)]
    lines[2] = row
    path = tmp_path / f"pairs{suffix}"
    path.write_text(f"anchor{sep}positive\n" + "\n".join(lines) + "\n")
    return path


def test_a_tsv_quote_running_over_lines_is_named_where_it_opens(tmp_path):
    path = pairs_with_row_2(tmp_path, ".tsv", 'claim 2\t"abstract 2 with a quote that never closes')
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path)))
    assert str(e.value) == (f'{path}:4: a quote (") opens a field that runs on to line 16; a TSV field holds no '
                            "line break: close the quote on line 4 or remove it")
    path = pairs_with_row_2(tmp_path, ".tsv", 'claim 2\t"abstract 2, quoted"')  # closed on its line: read as before
    ds = load_pairs(DatasetConfig(path=str(path)))
    assert len(ds) == 15 and ds.positive[2] == "abstract 2, quoted"


def test_a_csv_quote_that_never_closes_is_named_where_it_opens(tmp_path):
    path = pairs_with_row_2(tmp_path, ".csv", 'claim 2,"abstract 2, with a quote that never closes')
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path)))
    assert str(e.value) == (f'{path}:4: a quote (") opens a field that never closes (the file ends inside it, on '
                            "line 16): close the quote on line 4 or remove it")
    path = pairs_with_row_2(tmp_path, ".csv", 'claim 2,"abstract 2,\nover two lines"')  # a quoted line break
    ds = load_pairs(DatasetConfig(path=str(path)))
    assert len(ds) == 15 and ds.positive[2] == "abstract 2,\nover two lines"


def test_two_columns_for_one_role_and_a_repeated_header_are_refused(tmp_path):
    path = jsonl(tmp_path, [{"q": "claim", "doc": "title", "p": "abstract"}, {"q": "c2", "doc": "t2", "p": "a2"}])
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path), columns={"q": "anchor", "doc": "anchor", "p": "positive"}))
    assert str(e.value) == (f"{path}: columns 'q' and 'doc' are all mapped to 'anchor'; map one column to 'anchor' "
                            "(only 'negative' takes several)")
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("anchor,positive,anchor\nfirst,p1,second\nf2,p2,s2\n")
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(csv_path)))
    assert str(e.value) == (f"{csv_path}:1: the header names column 'anchor' more than once; give each column its "
                            "own name")


def test_cells_are_text_as_written_and_invisible_text_is_empty(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("anchor,positive\nNA,None\nnull,n/a\nNaN,#N/A\n")
    assert load_pairs(DatasetConfig(path=str(path))).table.to_dict() == {
        "anchor": ["NA", "null", "NaN"], "positive": ["None", "n/a", "#N/A"]}
    path.write_text("anchor,positive\nNA,None\nclaim,\n")
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path)))
    assert str(e.value) == f"{path}:3 field 'positive': text is empty"
    for invisible in ("\u200b\u200b", " \ufeff\u200d ", "\u2060"):
        path = jsonl(tmp_path, [{"anchor": "claim", "positive": "abstract"}, {"anchor": invisible, "positive": "x"}])
        with pytest.raises(DataError) as e:
            load_pairs(DatasetConfig(path=str(path)))
        assert str(e.value) == f"{path}:2 field 'anchor': text is empty"
    path = jsonl(tmp_path, [{"anchor": "\u200bclaim", "positive": "abstract"}])  # visible text after it: kept
    assert load_pairs(DatasetConfig(path=str(path))).anchor == ["\u200bclaim"]


@pytest.mark.parametrize("bad, message", [
    ('{"anchor": NaN, "positive": "c"}', "field 'anchor': nan is not a JSON number"),
    ('{"anchor": 1, "positive": "c"}', "field 'anchor': a number where line 3 has a string"),
    ('{"anchor": "x", "positive": {"text": "c"}}', "field 'positive': a JSON object where line 3 has a string"),
])
def test_a_jsonl_row_that_datasets_cannot_read_is_named_by_line(tmp_path, bad, message):
    path = jsonl(tmp_path, ["", "", '{"anchor": "a", "positive": "b"}', bad])  # leading blank lines
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(path)))
    assert str(e.value).startswith(f"{path}:4 {message}")


def test_csv_records_over_several_lines_are_named_by_their_own_lines(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('a,p\nq1,"an abstract\nover two lines"\nq2,d2\n\nq3,"a third\nabstract"\nq4,""\nq5,"\n\nx"\n')
    with pytest.raises(DataError, match=r"pairs.csv:8 field 'p': text is empty"):
        load_pairs(DatasetConfig(path=str(path), columns={"a": "anchor", "p": "positive"}))
    path.write_text('a,p\nq1,"an abstract\nover two lines"\nq2,"  \n "\n')
    with pytest.raises(DataError, match=r"pairs.csv:4-5 field 'p': text is empty"):
        load_pairs(DatasetConfig(path=str(path), columns={"a": "anchor", "p": "positive"}))
