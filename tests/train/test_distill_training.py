"""Training from teacher scores: the score columns read by name, through the token cache into the step in batch
order; missing scores and settings distillation cannot use refused before any work; a run whose first logged loss
is the configured loss of its first batch."""
import json

import pytest
import torch

from tests.helpers import SMOKE, recipe_args, records, run_train, train_in_process
from twinfold.losses import Distillation, InfoNCE, Matryoshka
from twinfold.models import BiEncoder
from twinfold.train.config import ConfigError, DatasetConfig, load_config
from twinfold.train.data.batches import StepBatches
from twinfold.train.data.pairs import DataError, PairDataset, load_pairs, tokenize_pairs
from twinfold.train.data.plan import Batch, BatchPlan, RowKeys
from twinfold.train.loop import build_loss

ROWS = 16


@pytest.fixture(scope="module")
def scored(data_dir, tmp_path_factory):
    """16 SciFact pairs with two negatives each (the positives of 32 later pairs) and made-up teacher scores."""
    with open(data_dir / "scifact-train-pairs" / "train.jsonl") as f:
        pairs = [json.loads(next(f)) for _ in range(3 * ROWS)]
    texts = [p["positive"][:300] for p in pairs]
    rows = [{"anchor": p["anchor"], "positive": texts[i], "negative_1": texts[ROWS + 2 * i],
             "negative_2": texts[ROWS + 2 * i + 1], "source": "scifact",
             "score_positive": 0.9 - 0.01 * i, "score_negative_1": 0.5 + 0.02 * i, "score_negative_2": 0.1 * (i % 3)}
            for i, p in enumerate(pairs[:ROWS])]
    path = tmp_path_factory.mktemp("scored") / "scored.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def rewrite(path, rows, change):
    """`rows` with `change(line, row)` applied to each, written to `path`."""
    path.write_text("".join(json.dumps(change(n, dict(r))) + "\n" for n, r in enumerate(rows, 1)))
    return path


NEGATIVES = {"anchor": "anchor", "positive": "positive", "negative_1": "negative", "negative_2": "negative"}


def test_scores_are_read_by_name_and_follow_the_mapped_negatives(scored):
    path, rows = scored
    swapped = {"anchor": "anchor", "positive": "positive", "negative_2": "negative", "negative_1": "negative"}
    ds = load_pairs(DatasetConfig(path=str(path), columns=swapped), "margin_mse")
    assert ds.roles == ["anchor", "positive", "negative_0", "negative_1"] and ds.has_scores
    assert ds.texts("negative_0") == [r["negative_2"] for r in rows]  # the first mapped negative
    assert ds.table["scores"] == [[r["score_positive"], r["score_negative_2"], r["score_negative_1"]] for r in rows]
    plain = load_pairs(DatasetConfig(path=str(path), columns=swapped))  # InfoNCE reads no scores
    assert plain.roles == ds.roles and not plain.has_scores
    assert plain.fingerprint != ds.fingerprint  # the token cache and checks are keyed by what was read
    mined = rewrite(path.with_name("one.jsonl"), rows, lambda n, r: {"anchor": r["anchor"], "positive": r["positive"],
                                                                  "negative": r["negative_1"],
                                                                  "score_positive": r["score_positive"],
                                                                  "score_negative_1": r["score_negative_1"]})
    one = load_pairs(DatasetConfig(path=str(mined)), "kl")  # `twinfold mine`'s one negative, no mapping
    assert one.table["scores"] == [[r["score_positive"], r["score_negative_1"]] for r in rows]


def test_scores_pass_the_token_cache_and_reach_each_process_in_batch_order(scored, tiny_bert_path, tmp_path):
    path, rows = scored
    model = BiEncoder.from_pretrained(tiny_bert_path)
    ds = load_pairs(DatasetConfig(path=str(path), columns=NEGATIVES), "margin_mse")
    tokens = tokenize_pairs(ds, model.text_tokenizer, tmp_path / "cache")
    again = tokenize_pairs(ds, model.text_tokenizer, tmp_path / "cache")  # read back from the cache
    expected = [[rows[i][f"score_{c}"] for c in ("positive", "negative_1", "negative_2")] for i in (3, 0, 7, 5)]
    assert tokens.scores([3, 0, 7, 5]) == again.scores([3, 0, 7, 5]) == expected
    batch = Batch(0, [3, 0, 7, 5])
    for rank in (0, 1):
        step = StepBatches([again], rank, 2, model.padder, 2048, None)[(0, 0, batch)]
        assert step["scores"].tolist() == [pytest.approx(row) for row in expected[2 * rank:2 * rank + 2]]
    plain = tokenize_pairs(load_pairs(DatasetConfig(path=str(path), columns=NEGATIVES)), model.text_tokenizer,
                           tmp_path / "cache")
    assert plain.scores([0]) is None and "scores" not in StepBatches([plain], 0, 1, model.padder, 2048, None)[
        (0, 0, batch)]


@pytest.mark.parametrize("change, columns, message", [
    (lambda n, r: {k: v for k, v in r.items() if k != "score_negative_2"}, NEGATIVES,
     "{path}: no column 'score_negative_2' (the teacher's score of 'negative_2') for loss.kind margin_mse; add the "
     "scores with twinfold score --teacher MODEL --data {path} --out SCORED.jsonl"),
    (lambda n, r: r, {"anchor": "anchor", "positive": "positive"}, "{path}: no hard negatives; loss.kind margin_mse"),
    (lambda n, r: {**r, "hard": r["negative_1"]}, {"anchor": "anchor", "positive": "positive", "hard": "negative"},
     "{path}: column 'hard' (negative_0) has no teacher score"),
    (lambda n, r: {**r, "score_positive": None if n == 3 else r["score_positive"]}, NEGATIVES,
     "{path}:3 field 'score_positive': None is not a finite number (a teacher score)"),
    (lambda n, r: {**r, "score_negative_1": str(r["score_negative_1"])}, NEGATIVES,
     "{path}:1 field 'score_negative_1': '0.5' is not a finite number"),
])
def test_missing_or_bad_scores_are_one_line_errors_naming_the_file(scored, tmp_path, change, columns, message):
    path, rows = scored
    bad = rewrite(tmp_path / "bad.jsonl", rows, change)
    with pytest.raises(DataError) as e:
        load_pairs(DatasetConfig(path=str(bad), columns=columns), "margin_mse")
    assert str(e.value).startswith(message.format(path=bad)) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["loss.kind=mse"], "loss.kind: 'mse' is not one of infonce, margin_mse, kl"),
    (["loss.teacher_temperature=0.5"], "loss.teacher_temperature: 0.5 is for loss.kind margin_mse or kl"),
    (["loss.kind=kl", "loss.symmetric=true"], "loss.symmetric: an InfoNCE setting; loss.kind kl compares"),
    (["loss.kind=margin_mse", "loss.learnable_temperature=true"], "loss.learnable_temperature: an InfoNCE setting"),
    (["loss.kind=margin_mse", "loss.teacher_temperature=0"], "loss.teacher_temperature: 0.0 must be greater than 0"),
    (["loss.kind=margin_mse", "data.train=[{{path: {pairs}, hard_negatives: {{num_negatives: 1}}}}]"],
     "data.train[0].hard_negatives: negatives mined during the run have no teacher scores"),
    (["loss.kind=kl", "data.train=[{{path: {pairs}, streaming: true}}]", "train.max_steps=2"],
     "data.train[0].streaming: loss.kind kl reads teacher scores"),
])
def test_settings_distillation_cannot_use_are_config_errors(data_dir, overrides, message):
    pairs = data_dir / "scifact-train-pairs" / "train.jsonl"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(SMOKE, [o.format(pairs=pairs) for o in overrides])


def test_build_loss_distils_inside_matryoshka_with_the_teacher_temperature():
    loss = build_loss(load_config(SMOKE, ["loss.kind=kl", "loss.temperature=0.1", "loss.teacher_temperature=2"]))
    assert isinstance(loss, Matryoshka) and isinstance(loss.inner, Distillation)
    assert (loss.inner.kind, loss.inner.temperature, loss.inner.teacher_temperature) == ("kl", 0.1, 2.0)
    assert build_loss(load_config(SMOKE, ["loss.kind=margin_mse"])).inner.teacher_temperature == 0.05  # null: t


def test_a_run_distils_its_first_batch_from_the_teachers_scores(scored, tiny_bert_path, tmp_path):
    path, rows = scored
    data = f"data.train=[{{path: {path}, columns: {{anchor: anchor, positive: positive, negative_1: negative, " \
           "negative_2: negative}}]"
    out = run_train(tmp_path, "distil", data, "loss.kind=margin_mse", "train.log_steps=1", "train.save_steps=null",
                    "train.max_steps=2", "data.cache_dir=" + str(tmp_path / "cache"), tiny=tiny_bert_path)
    cfg = load_config(out / "config.yaml")
    first = [r for r in records(out) if "loss" in r][0]

    # the first batch of the plan, embedded by the untrained model, under the configured loss
    ds = load_pairs(cfg.data.train[0], "margin_mse")
    model = BiEncoder.from_pretrained(tiny_bert_path, max_length=32, dropout=0.0)
    tokens = tokenize_pairs(ds, model.text_tokenizer, tmp_path / "cache")
    (rows_of_batch,) = [b.rows for b in BatchPlan([RowKeys.of(tokens)], cfg.train.batch_size, cfg.train.seed)
                        .epoch(0)[:1]]
    picked = PairDataset(ds.name, ds.table.select(rows_of_batch), 1.0)
    with torch.no_grad():
        embeddings = {"anchor": model.embed(picked.anchor, "query"),
                      "positive": model.embed(picked.positive, "document"),
                      "negative": model.embed([t for row in picked.negatives for t in row], "document")}
    expected = build_loss(cfg)(embeddings, {"scores": torch.tensor(picked.table["scores"])})
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert ("- loss: MarginMSE distilled from teacher scores, student temperature 0.05, teacher temperature 0.05 "
            "inside Matryoshka [128, 64]") in (out / "final" / "README.md").read_text()

    unscored = rewrite(tmp_path / "unscored.jsonl", rows, lambda n, r: {k: v for k, v in r.items() if "score" not in k})
    result = train_in_process(recipe_args(tmp_path / "refused", data.replace(str(path), str(unscored)),
                                          "loss.kind=margin_mse", tiny=tiny_bert_path))
    assert result.returncode == 2
    assert f"error: {unscored}: no column 'score_positive' (the teacher's score of 'positive')" in result.stderr
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_the_scifact_recipe_distils_with_margin_mse_from_the_scored_triplets(scored, data_dir, monkeypatch):
    monkeypatch.setenv("TWINFOLD_DATA", str(data_dir))
    recipe = SMOKE.parent / "scifact_distill.yaml"
    cfg = load_config(recipe, [f"data.train=[{{path: {scored[0]}}}]"])  # its own file: made by the recipe's commands
    loss = build_loss(cfg)
    assert isinstance(loss.inner, Distillation) and loss.inner.kind == "margin_mse" and loss.dims == [384, 256, 128, 64]
    assert (loss.inner.temperature, loss.inner.teacher_temperature) == (0.05, 0.05)
    baseline = load_config(recipe, [f"data.train=[{{path: {scored[0]}}}]", "loss.kind=infonce"])  # its InfoNCE run
    assert isinstance(build_loss(baseline).inner, InfoNCE)
