"""train.config: recipes, overrides, env expansion, and errors that name the key."""
import pytest

from train.config import ConfigError, load_config, save_config


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
    ("train.batch_size=0", "train.batch_size: 0 must be greater than 0"),
    ("train.lr=-1e-5", "train.lr: -1e-05 must be greater than 0"),
    ("train.batch_size=abc", "train.batch_size: expected int, got 'abc'"),
    ("train.resume=maybe", "train.resume: expected bool"),
    ("loss.matryoshka_dims=[64,128]", "sorted largest first"),
    ("loss.matryoshka_dims=[128,128]", "distinct"),
    ("loss.matryoshka_weights=[1]", "1 weights for 2 dims"),
    ("train.scheduler=step", "train.scheduler: 'step' is not one of linear, cosine"),
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


def test_an_override_that_is_not_yaml_names_itself(tmp_path, pairs):
    with pytest.raises(ConfigError, match=r"override 'data.train=\[\{path: \$\{X\}\}\]': the value is not valid YAML"):
        load_config(write(tmp_path, recipe(pairs)), ["data.train=[{path: ${X}}]"])


def test_hard_negatives_and_checks_round_trip(tmp_path, pairs):
    cfg = load_config(write(tmp_path, recipe(pairs, "      hard_negatives: {num_negatives: 3, sampling: random}\n")),
                      ["data.dedup=true", "data.drop_eval_overlap=true", "eval.bm25_preset=anserini"])
    h = cfg.data.train[0].hard_negatives
    assert (h.num_negatives, h.sampling, h.range_max, h.max_score_ratio) == (3, "random", 50, 0.95)
    assert cfg.data.dedup and cfg.data.drop_eval_overlap and cfg.eval.bm25_preset == "anserini"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
