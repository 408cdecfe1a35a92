"""train.streams: streamed datasets read, checked and tokenized on the fly, packed without repeated texts within a
buffer, mixed by weight, each process reading its part, resumed exactly from any position (and after SIGKILL)."""
import json
import random

import pytest

from tests.builders import assemble_texts
from tests.helpers import kill_after, max_diff, recipe_args, run_train, start_process, train_command, weights
from twinfold.losses import text_keys
from twinfold.models import BiEncoder
from twinfold.train.config import ConfigError, DatasetConfig, load_config
from twinfold.train.data.batches import stream_loader
from twinfold.train.data.pairs import DataError, load_pairs
from twinfold.train.data.streams import StreamSource, StreamSteps, choose_dataset


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def toy(tmp_path, n=60, name="pairs.jsonl"):
    """n rows; positives repeat every 40 rows, negatives every 7."""
    rows = [{"a": f"claim {i}", "p": f"abstract {i % 40} " + "word " * (i % 9), "n": f"other {i % 7}"}
            for i in range(n)]
    return write(tmp_path / name, rows), rows


def source(path, **kw):
    columns = {"a": "anchor", "p": "positive", "n": "negative"}
    return StreamSource.streamed(DatasetConfig(path=str(path), columns=columns, streaming=True, **kw))


def steps(model, sources, position=None, rank=0, world=1, batch=4, buffer=16, mixing="proportional"):
    return StreamSteps(sources, [model.text_tokenizer] * len(sources), model.padder, 64, None, rank, world, batch, 0,
                       mixing, buffer, position)


def content(item):
    """What a step trains on: its place and every chunk's ids, the order and the keys."""
    return (item["epoch"], item["index"], {role: [c["input_ids"].tolist() for c in chunks]
                                           for role, chunks in item["chunks"].items()},
            {role: o.tolist() for role, o in item["order"].items()},
            {role: k.tolist() for role, k in item["keys"].items()})


def texts_of(rows) -> dict[int, str]:
    """Text key -> text of every field of the rows."""
    texts = [r[f] for r in rows for f in ("a", "p", "n")]
    return dict(zip(text_keys(texts).tolist(), texts))


@pytest.fixture(scope="module")
def model(tiny_bert_path):
    return BiEncoder.from_pretrained(tiny_bert_path, max_length=16)


def test_batches_hold_no_repeated_text_use_each_row_once_a_pass_and_are_the_tokenizers(tmp_path, model):
    path, rows = toy(tmp_path)
    items = [item for item, _ in zip(steps(model, [source(path)]), range(30))]
    key_of = texts_of(rows)
    first_pass = [item for item in items if item["epoch"] == 0]
    anchors = [key_of[k] for item in first_pass for k in item["keys"]["anchor"].tolist()]
    assert len(first_pass) == 15 and sorted(anchors) == sorted(r["a"] for r in rows)  # 60 rows, batches of 4
    assert [item["index"] for item in items] == list(range(30)) and items[15]["epoch"] == 1
    for item in items:
        texts = {role: [key_of[k] for k in item["keys"][role].tolist()] for role in item["keys"]}
        core = texts["anchor"] + texts["positive"]
        assert len(set(core)) == len(core) and not set(core) & set(texts["negative"])
        expected = assemble_texts(model, texts, 64)  # tokenized as the model tokenizes
        assert content({**expected, "epoch": item["epoch"], "index": item["index"]}) == content(item)


def test_resume_from_any_position_gives_the_same_batches(tmp_path, model):
    path, _ = toy(tmp_path)
    items = [item for item, _ in zip(steps(model, [source(path)]), range(24))]
    for k in range(0, 23, 2):  # positions inside blocks, at their ends, across a pass
        position = json.loads(json.dumps(items[k]["position"]))  # as the checkpoint keeps it
        again = [item for item, _ in zip(steps(model, [source(path)], position), range(k + 1, 24))]
        assert [content(i) for i in again] == [content(i) for i in items[k + 1:]], f"resumed after batch {k}"


def test_a_loader_worker_gives_what_the_inline_loader_gives(tmp_path, model):
    path, _ = toy(tmp_path)
    inline = [i for i, _ in zip(stream_loader(steps(model, [source(path)]), {"num_workers": 0}), range(10))]
    worker = [i for i, _ in zip(stream_loader(steps(model, [source(path)]), {"num_workers": 4, "prefetch_factor": 2}),
                                range(10))]
    assert [content(i) for i in worker] == [content(i) for i in inline]
    assert [i["position"] for i in worker] == [i["position"] for i in inline]
    position = json.loads(json.dumps(worker[6]["position"]))
    assert [content(i) for i, _ in zip(steps(model, [source(path)], position), range(3))] == \
        [content(i) for i in inline[7:10]]


def test_csv_tsv_and_parquet_stream_as_jsonl_does(tmp_path, model):
    import pandas as pd

    path, rows = toy(tmp_path, n=24)
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    frame.to_csv(tmp_path / "pairs.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "pairs.parquet")
    expected = [content(i) for i, _ in zip(steps(model, [source(path)]), range(8))]
    for name in ("pairs.csv", "pairs.tsv", "pairs.parquet"):
        assert [content(i) for i, _ in zip(steps(model, [source(tmp_path / name)]), range(8))] == expected, name


def test_a_folder_in_hub_repository_layout_streams_like_its_rows_and_by_shards(tmp_path, model):
    """`path` a hub id or a folder laid out like a hub dataset repository: the same `datasets` call reads both."""
    import pandas as pd

    path, rows = toy(tmp_path, n=40)
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    for shard in range(2):
        pd.DataFrame(rows[20 * shard:20 * (shard + 1)]).to_parquet(repo / f"train-0000{shard}-of-00002.parquet")
    expected = [content(i) for i, _ in zip(steps(model, [source(path)]), range(6))]
    assert [content(i) for i, _ in zip(steps(model, [source(repo.parent, split="train")]), range(6))] == expected
    key_of = texts_of(rows)
    for rank in (0, 1):  # two shards, two processes: each reads one whole shard
        part = [i for i, _ in zip(steps(model, [source(repo.parent, split="train")], rank=rank, world=2), range(4))]
        anchors = {key_of[k] for i in part for k in i["keys"]["anchor"].tolist()}
        assert anchors and anchors <= {r["a"] for r in rows[20 * rank:20 * (rank + 1)]}
    loaded = load_pairs(DatasetConfig(path=str(repo.parent), split="train", columns={"a": "anchor", "p": "positive"}))
    assert loaded.anchor == [r["a"] for r in rows]  # loaded whole too


def test_each_process_reads_its_part_and_all_agree_on_the_dataset_of_each_batch(tmp_path, model):
    path, rows = toy(tmp_path, n=64)
    other, _ = toy(tmp_path, n=48, name="other.jsonl")
    parts = [[i for i, _ in zip(steps(model, [source(path), source(other, weight=2.0)], rank=rank, world=2, batch=8),
                                range(12))] for rank in (0, 1)]
    assert [i["dataset"] for i in parts[0]] == [i["dataset"] for i in parts[1]]  # no talking needed
    assert {i["dataset"] for i in parts[0]} == {0, 1} and all(len(i["keys"]["anchor"]) == 4 for p in parts for i in p)
    key_of = texts_of(rows)
    for rank, part in enumerate(parts):  # process r reads rows r, r + 2, ... of the file
        anchors = [key_of[k] for i in part if i["dataset"] == 0 and i["epoch"] == 0
                   for k in i["keys"]["anchor"].tolist()]
        assert anchors and set(anchors) <= {r["a"] for r in rows[rank::2]} and len(set(anchors)) == len(anchors)


def rounds(weights: list[float], batches: int) -> list[int]:
    taken, order = [0] * len(weights), []
    for batch in range(batches):
        order.append(choose_dataset("round_robin", weights, 0, batch, taken))
        taken[order[-1]] += 1
    return order


def test_mixing_by_weight():
    assert rounds([1.0, 1.0], 4) == [0, 1, 0, 1]
    order = rounds([2.0, 1.0], 300)
    assert order[:6] == [0, 1, 0, 0, 1, 0] and order.count(0) == 200
    drawn = [choose_dataset("proportional", [3.0, 1.0], 7, b, [0, 0]) for b in range(1000)]
    assert drawn == [choose_dataset("proportional", [3.0, 1.0], 7, b, [0, 0]) for b in range(1000)]  # seeded
    assert 0.7 < drawn.count(0) / 1000 < 0.8


@pytest.mark.parametrize("rows, message", [
    ([{"a": "x", "p": "y", "n": "z"}] * 6 + ['{"a": "x", "p": '], ":7: not valid JSON"),
    ([{"a": f"x{i}", "p": "y", "n": "z"} for i in range(4)] + [{"a": "x", "p": "", "n": "z"}],
     ":5 field 'p': text is empty"),
    ([{"a": f"x{i}", "p": "y", "n": "z"} for i in range(8)] + [{"a": "x", "p": None, "n": "z"}],
     ":9 field 'p': text is missing (null)"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, model, rows, message):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        next(iter(steps(model, [source(path)], batch=2)))
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_process_names_the_file_line_of_its_rows(tmp_path, model):
    rows = [{"a": f"x{i}", "p": f"y{i}", "n": "z"} for i in range(5)] + [{"a": "x", "p": "", "n": "z"}]
    path = write(tmp_path / "bad.jsonl", rows)  # process 1 of 2 reads rows 1, 3, 5: lines 2, 4, 6
    with pytest.raises(DataError, match=r"bad.jsonl:6 field 'p': text is empty"):
        next(iter(steps(model, [source(path)], rank=1, world=2, batch=2, buffer=4)))


def test_too_few_distinct_rows_for_a_batch(tmp_path, model):
    path = write(tmp_path / "dup.jsonl", [{"a": "same", "p": f"d{i}", "n": "z"} for i in range(20)])
    with pytest.raises(DataError, match="fewer than one batch of 4 rows without a repeated text"):
        next(iter(steps(model, [source(path)], buffer=32)))


def test_streaming_config_rules(tmp_path):
    path, _ = toy(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  train:\n    - path: {path}\n      columns: {{a: anchor, p: positive}}\n"
                      "      streaming: true\n")
    with pytest.raises(ConfigError, match=r"data.train\[0\].streaming: a stream has no known length; set train.max"):
        load_config(recipe)
    assert load_config(recipe, ["train.max_steps=5"]).data.train[0].streaming
    with pytest.raises(ConfigError, match="data.dedup: compares every training pair"):
        load_config(recipe, ["train.max_steps=5", "data.dedup=true"])
    with pytest.raises(ConfigError, match="data.shuffle_buffer: 16 rows cannot hold a batch of train.batch_size 32"):
        load_config(recipe, ["train.max_steps=5", "data.shuffle_buffer=16"])


def test_resume_after_sigkill_continues_at_the_exact_stream_position(tmp_path, tiny_bert_path, data_dir):
    pairs = (data_dir / "scifact-train-pairs" / "train.jsonl").read_text().splitlines()
    streamed, loaded = write(tmp_path / "streamed.jsonl", pairs[:20]), write(tmp_path / "loaded.jsonl", pairs[20:60])
    data = ("data.train=[{path: %s, streaming: true, columns: {anchor: anchor, positive: positive}}, "
            "{path: %s, columns: {anchor: anchor, positive: positive}}]" % (streamed, loaded))
    # round robin: odd steps from the stream, whose 20 rows in blocks of 16 give 2 batches of 8 a pass
    overrides = (data, "data.mixing=round_robin", "data.shuffle_buffer=16", "train.max_steps=8", "train.save_steps=2",
                 "model.dropout=0.1", "train.lr=1e-3", "train.batch_size=8", "train.log_steps=1")
    full = run_train(tmp_path, "full", *overrides, tiny=tiny_bert_path)
    out = tmp_path / "killed"
    proc = start_process(train_command(recipe_args(out, *overrides, tiny=tiny_bert_path)))
    at = random.randint(3, 6)
    kill_after(out, proc, at)
    positions = json.loads(next((out / "checkpoints").glob("step-*/streams.json")).read_text())
    assert len(positions) == 1 and len(positions[0]["datasets"]) == 2  # one process, two datasets
    run_train(tmp_path, "killed", *overrides, "train.resume=true", tiny=tiny_bert_path)
    assert max_diff(weights(full / "final"), weights(out / "final")) == 0.0, f"killed after step {at}"
    records = [[json.loads(line) for line in (o / "metrics.jsonl").read_text().splitlines()] for o in (full, out)]
    assert [r["loss"] for r in records[0]] == [r["loss"] for r in records[1]] and len(records[0]) == 8
    assert [r["epoch"] for r in records[0]] == [0, 0, 0, 0, 1, 0, 1, 0]  # the stream's second pass from step 5


def test_two_processes_each_read_their_part_and_checkpoint_their_positions(tmp_path, tiny_bert_path, data_dir):
    pairs = (data_dir / "scifact-train-pairs" / "train.jsonl").read_text().splitlines()[:40]
    streamed = write(tmp_path / "streamed.jsonl", pairs)
    out = run_train(tmp_path, "two", "data.train=[{path: %s, streaming: true}]" % streamed, "data.shuffle_buffer=12",
                    "train.max_steps=4", "train.save_steps=2", "train.batch_size=8", tiny=tiny_bert_path, processes=2)
    positions = json.loads((out / "checkpoints" / "step-4" / "streams.json").read_text())
    assert [p["batches"] for p in positions] == [4, 4]  # 4 global batches of 8: 4 pairs from each process
    # each process read 4 x 4 = 16 of its 20 rows (rows 0, 2, ... and 1, 3, ...) in blocks of 12: one block and part
    # of the next, which starts after its 12 rows
    assert [(p["datasets"][0]["pass"], p["datasets"][0]["read"]) for p in positions] == [(0, 12), (0, 12)]
    assert (out / "final" / "model.safetensors").exists()
