"""train.config: recipes, overrides, env expansion, and errors that name the key."""
import re
from pathlib import Path

import pytest

from tests.helpers import REPO
from twinfold.train.config import ConfigError, load_config, save_config


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"q": "a", "d": "b"}\n')
    return path


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def recipe(pairs, extra: str = "") -> str:
    return f"data:\n  train:\n    - path: {pairs}\n      columns: {{q: anchor, d: positive}}\n{extra}"


def test_defaults_overrides_and_round_trip(tmp_path, pairs):
    cfg = load_config(write(tmp_path, recipe(pairs, "train:\n  lr: 1.0e-5\n")),
                      ["train.lr=3e-5", "loss.matryoshka_dims=[256,64]", "model.dropout=null", "train.batch_size=16"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.loss.matryoshka_dims == [256, 64] and cfg.train.batch_size == 16
    assert cfg.model.dropout is None and cfg.loss.temperature == 0.05
    assert cfg.data.train[0].columns == {"q": "anchor", "d": "positive"}
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_environment_variables_expand(tmp_path, pairs, monkeypatch):
    monkeypatch.setenv("PAIRS_DIR", str(pairs.parent))
    cfg = load_config(write(tmp_path, recipe("${PAIRS_DIR}/pairs.jsonl", "train:\n  output_dir: ${NOPE:-runs/x}\n")))
    assert cfg.data.train[0].path == str(pairs) and cfg.train.output_dir == "runs/x"
    with pytest.raises(ConfigError, match="NOT_SET_VAR is not set"):
        load_config(write(tmp_path, recipe("${NOT_SET_VAR}/p.jsonl")))


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1", "unknown config key 'train.lerning_rate'"),
    ("train.batchsize=8", "did you mean 'train.batch_size'"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("train.batch_size=0", "train.batch_size: 0; in-batch negatives need at least 2 pairs"),
    ("train.lr=-1e-5", "train.lr: -1e-05 must be greater than 0"),
    ("train.batch_size=abc", "train.batch_size: expected int, got 'abc'"),
    ("train.resume=maybe", "train.resume: expected bool"),
    ("loss.matryoshka_dims=[64,128]", "sorted largest first"),
    ("loss.matryoshka_dims=[128,128]", "distinct"),
    ("loss.matryoshka_weights=[1]", "loss.matryoshka_weights: weights: 1 for dims"),
    ("train.scheduler=step", "train.scheduler: 'step' is not one of linear, cosine"),
    ("model.unpad=sometimes", "model.unpad: 'sometimes' is not one of auto, true, false"),
    ("eval.data=/no/such/beir", "eval.data: /no/such/beir is not a folder"),
    ("lr=1", "write it as section.key=value"),
])
def test_errors_name_the_key(tmp_path, pairs, override, message):
    path = write(tmp_path, recipe(pairs, "loss:\n  matryoshka_dims: [128, 64]\n"))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(path, [override])


def test_missing_data_path_and_bad_roles(tmp_path):
    with pytest.raises(ConfigError, match="data.train\\[0\\].path: /nope/pairs.jsonl does not exist"):
        load_config(write(tmp_path, recipe("/nope/pairs.jsonl")))
    with pytest.raises(ConfigError, match="roles \\['query'\\]"):
        load_config(write(tmp_path, "data:\n  train:\n    - path: x.jsonl\n      columns: {a: query}\n"))
    with pytest.raises(ConfigError, match="no training datasets"):
        load_config(write(tmp_path, "train:\n  lr: 1.0e-5\n"))


def test_eval_metric_is_checked_at_load_time(tmp_path, pairs):
    path = write(tmp_path, recipe(pairs))
    with pytest.raises(ConfigError, match=r"eval.metric: 'ndcg@20' is not a metric .*did you mean 'ndcg@10'\?"):
        load_config(path, ["eval.metric=ndcg@20"])
    with pytest.raises(ConfigError, match="sts_spearman needs eval.sts"):
        load_config(path, ["eval.metric=sts_spearman"])
    assert load_config(path, ["eval.metric=recall@100"]).eval.metric == "recall@100"
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\n")
    assert load_config(path, ["eval.metric=sts_spearman", f"eval.sts={sts}"]).eval.metric == "sts_spearman"


def test_every_reported_metric_name_is_accepted(tmp_path, pairs):
    from twinfold.train.eval.metrics import evaluate_run

    reported = evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 1}})
    path = write(tmp_path, recipe(pairs))
    for name in reported:
        assert load_config(path, [f"eval.metric={name}"]).eval.metric == name
def test_overrides_are_read_as_their_keys_type(tmp_path, pairs):
    path = write(tmp_path, recipe(pairs, "model:\n  query_prefix: 'x'\nloss:\n  matryoshka_weights: [1.0]\n"
                                        "  matryoshka_dims: [64]\n"))
    cfg = load_config(path, ["train.mixed_precision=no", "model.query_prefix=query: ", "log.run_name=123",
                             "model.document_prefix=", "train.resume=true", "model.normalize=False",
                             "train.max_steps=7", "train.lr=3e-5", "train.max_grad_norm=null",
                             "loss.matryoshka_weights=null", "eval.precisions=[float32, int8]", "eval.dims=64,32"])
    assert cfg.train.mixed_precision == "no" and cfg.model.query_prefix == "query: "
    assert cfg.log.run_name == "123" and cfg.model.document_prefix == ""
    assert cfg.train.resume is True and cfg.model.normalize is False
    assert cfg.train.max_steps == 7 and cfg.train.lr == 3e-5 and cfg.train.max_grad_norm is None
    assert cfg.loss.matryoshka_weights is None
    assert cfg.eval.precisions == ["float32", "int8"] and cfg.eval.dims == [64, 32]
    assert load_config(path, ["train.max_steps="]).train.max_steps is None
    for override, message in (("train.resume=yes", "train.resume: expected bool (true or false), got 'yes'"),
                              ("train.max_steps=7.5", "train.max_steps: expected int, got '7.5'"),
                              ("train.lr=fast", "train.lr: expected float, got 'fast'"),
                              ("eval.dims=[64", "eval.dims: not valid YAML")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path, [override])


def test_hard_negatives_and_checks_round_trip(tmp_path, pairs):
    cfg = load_config(write(tmp_path, recipe(pairs, "      hard_negatives: {num_negatives: 3, sampling: random}\n")),
                      ["data.dedup=true", "data.drop_eval_overlap=true", "eval.bm25_preset=anserini"])
    h = cfg.data.train[0].hard_negatives
    assert (h.num_negatives, h.sampling, h.range_max, h.max_score_ratio) == (3, "random", 50, 0.95)
    assert cfg.data.dedup and cfg.data.drop_eval_overlap and cfg.eval.bm25_preset == "anserini"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("name", ["scifact.yaml", "scifact_gpu.yaml", "scifact_mined.yaml", "smoke.yaml",
                                  "bge_m3_scifact.yaml", "qwen3_embedding_lora.yaml", "scifact_binary.yaml",
                                  "scifact_replay.yaml"])
def test_shipped_recipes_load_and_point_at_the_shared_data(name, data_dir, monkeypatch):
    monkeypatch.setenv("TWINFOLD_DATA", str(data_dir))
    cfg = load_config(REPO / "configs" / name)
    paths = [d.path for d in cfg.data.train] + [cfg.eval.data] + list(cfg.eval.general) + \
        [d.hard_negatives.corpus for d in cfg.data.train if d.hard_negatives and d.hard_negatives.corpus]
    assert all(Path(p).exists() for p in paths if p), paths


def test_yaml_keys_given_twice_and_aliases_are_refused_with_their_line(tmp_path, pairs):
    twice = recipe(pairs, "train:\n  lr: 1.0e-5\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: line 7: key 'train' appears twice"):
        load_config(write(tmp_path, twice))
    bomb = recipe(pairs, "log:\n  run_name: &a x\nmodel:\n  query_prefix: *a\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: line 8: alias \*a: aliases are not allowed"):
        load_config(write(tmp_path, bomb))


def test_string_keys_keep_numbers_as_written(tmp_path, pairs):
    cfg = load_config(write(tmp_path, recipe(pairs, "model:\n  query_prefix: 0123\nlog:\n  run_name: 1.10\n"
                                                    f"train:\n  output_dir: {tmp_path}/2024_06\n  seed: 0x10\n")))
    assert (cfg.model.query_prefix, cfg.log.run_name, cfg.train.seed) == ("0123", "1.10", 16)
    assert cfg.train.output_dir == f"{tmp_path}/2024_06"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("loss.temperature=inf", r"loss.temperature: 'inf' is not a finite number"),
    ("train.lr=nan", r"train.lr: 'nan' is not a finite number"),
    ("loss.temperature=0.005", r"loss.temperature: 0.005 is below the loss's minimum 0.01"),
    ("loss.matryoshka_weights=[-1,-1]", r"loss.matryoshka_weights: weights \[-1.0, -1.0\] must all be greater than 0"),
    ("train.batch_size=1", r"train.batch_size: 1; in-batch negatives need at least 2"),
    ("train.seed=-1", r"train.seed: -1 must be in \[0, 2\^32\)"),
    ("train.seed=4294967296", r"train.seed: 4294967296 must be in"),
    ("train.save_total_limit=0", r"train.save_total_limit: 0; keep at least the last checkpoint"),
    ("eval.dims=[0]", r"eval.dims: \[0\] must all be greater than 0"),
    ("eval.precisions=[float16]", r"eval.precisions: 'float16' is not one of float32, int8, binary"),
    ("eval.rescore_multiplier=0", r"eval.rescore_multiplier: 0 must be greater than 0"),
    ("loss.quantization.int8=0", r"loss.quantization: every weight is 0"),
    ("loss.quantization.binary=-1", r"loss.quantization.binary: -1.0 must not be negative"),
    ("loss.quantization={binary: 1, estimator: sigmoid}", r"loss.quantization.estimator: 'sigmoid' is not one of"),
    ("loss.quantization={binary: 1, dims: [32]}", r"loss.quantization.dims: \[32\] are not among loss.matryoshka_dims"),
    ("loss.quantization={binary: 1, bits: 2}", r"unknown config key 'loss.quantization.bits'"),
])
def test_values_no_run_can_use_are_refused_naming_the_key(tmp_path, pairs, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, recipe(pairs, "loss:\n  matryoshka_dims: [8, 4]\n")), [override])


def test_a_config_path_that_is_a_folder_or_not_utf8_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"model:\n  query_prefix: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not valid UTF-8 \(byte 26\)"):
        load_config(bad)


@pytest.mark.parametrize("override, message", [
    ("eval.dims=[256]", r"eval.dims: 256 is larger than the model's dimension 128"),
    ("model.max_length=512", r"model.max_length: 512 is more than the 128 positions"),
])
def test_values_beyond_the_model_are_refused_when_it_loads(tmp_path, pairs, tiny_bert_path, override, message):
    from twinfold.train.loop import build_model

    cfg = load_config(write(tmp_path, recipe(pairs, f"model:\n  name_or_path: {tiny_bert_path}\n")), [override])
    with pytest.raises(ConfigError, match=message):
        build_model(cfg)


def test_a_dataset_weight_beyond_the_cap_is_refused(tmp_path, pairs):
    text = f"data:\n  train:\n    - path: {pairs}\n      columns: {{q: anchor, d: positive}}\n      weight: 1.0e8\n"
    with pytest.raises(ConfigError, match=r"data.train\[0\].weight: 100000000.0 must be in \(0, 100\]"):
        load_config(write(tmp_path, text))
