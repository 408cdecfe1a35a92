"""BM25 settings: a hand-computed Lucene score at Anserini's k1/b, stemming, identifier splitting, and the
settings named in the evaluation report."""
import json
import math
import os
import sys

import pytest

from tests.helpers import SMOKE, run_process
from twinfold.train.eval.bm25 import BM25Index, BM25Settings, settings_from, split_identifiers
from twinfold.train.evaluate import main

DOCS = ["cell cell protein", "protein folding", "gene expression in yeast"]  # "in" is a stopword


@pytest.mark.parametrize("preset, k1, b", [("anserini", 0.9, 0.4), ("bm25s", 1.5, 0.75)])
def test_hand_computed_lucene_scores(preset, k1, b):
    index = BM25Index(DOCS, settings_from(preset))
    indices, scores = index.search(["cell protein"], 3)
    avgdl, n = 8 / 3, 3  # token counts 3, 2, 3

    def term(tf, df, dl):
        return math.log(1 + (n - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * dl / avgdl))

    expected = {0: term(2, 1, 3) + term(1, 2, 3), 1: term(1, 2, 2)}
    assert indices[0, :2].tolist() == [0, 1] and math.isnan(scores[0, 2])  # d2 shares no term: no hit
    assert scores[0, :2].tolist() == pytest.approx([expected[0], expected[1]], rel=1e-6)


def test_presets_and_overrides():
    assert settings_from("anserini") == BM25Settings(k1=0.9, b=0.4)
    assert settings_from(None, b=0.5) == BM25Settings(k1=1.5, b=0.5)
    assert settings_from("anserini", k1=1.2, stemmer="english").describe() == \
        "k1 1.2, b 0.4, lowercase, English stopwords, stemmer english"
    with pytest.raises(ValueError, match="BM25 preset 'lucene' is not one of bm25s, anserini"):
        settings_from("lucene")


def test_stemming_matches_word_forms():
    docs = ["the dog runs fast", "a cat sleeps"]
    _, plain = BM25Index(docs).search(["running dogs"], 1)
    assert math.isnan(plain[0, 0])
    indices, stemmed = BM25Index(docs, BM25Settings(stemmer="english")).search(["running dogs"], 1)
    assert indices[0, 0] == 0 and stemmed[0, 0] > 0


def test_identifier_splitting_for_code_like_text():
    assert split_identifiers("call getUserId on foo_bar.baz, HTTPResponse p53") == \
        "call getUserId get User Id on foo_bar.baz foo bar baz, HTTPResponse HTTP Response p53 p 53"
    assert split_identifiers("plain words stay") == "plain words stay"
    docs = ["def getUserId(request): return request.user_id", "def render_page(template): pass"]
    _, plain = BM25Index(docs).search(["user id"], 1)
    assert math.isnan(plain[0, 0])
    indices, split = BM25Index(docs, BM25Settings(split_identifiers=True)).search(["user id"], 1)
    assert indices[0, 0] == 0 and split[0, 0] > 0


def test_report_names_the_settings_of_the_bm25_row(tiny_bert_path, data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_bert_path), "--data", str(data_dir / "scifact-nano"), "--bm25",
                 "--bm25-preset", "anserini", "--bm25-stemmer", "english", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    (row,) = [r for r in report["results"] if r["model"] == "bm25"]
    assert row["bm25"] == "k1 0.9, b 0.4, lowercase, English stopwords, stemmer english"
    assert report["info"]["bm25"] == {"k1": 0.9, "b": 0.4, "stemmer": "english", "split_identifiers": False}
    assert f"BM25 settings: {row['bm25']}." in (out / "report.md").read_text()
    assert main(["--model", str(tiny_bert_path), "--data", str(data_dir / "scifact-nano"), "--bm25",
                 "--bm25-stemmer", "klingon", "--no-progress"]) == 2
    assert "error: BM25 stemmer 'klingon' is not one of" in capsys.readouterr().err


def test_config_checks_the_bm25_settings(data_dir, monkeypatch):
    from twinfold.train.config import ConfigError, load_config

    monkeypatch.setenv("TWINFOLD_DATA", str(data_dir))
    with pytest.raises(ConfigError, match="eval.bm25_\\*: BM25 k1 0.9 must be >= 0 and b 1.5 in"):
        load_config(SMOKE, ["eval.bm25_preset=anserini", "eval.bm25_b=1.5"])
    with pytest.raises(ConfigError, match="eval.bm25_preset: 'okapi' is not one of bm25s, anserini"):
        load_config(SMOKE, ["eval.bm25_preset=okapi"])


def test_bm25_never_imports_jax_even_where_it_is_installed(tmp_path):
    """bm25s imports JAX when it can (on a GPU machine that starts JAX's CUDA client); twinfold's BM25 keeps it out."""
    fake = tmp_path / "jax"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('jax was imported')\n")
    (fake / "lax.py").write_text("")
    probe = ("import sys; from twinfold.train.eval.bm25 import BM25Index, settings_from; "
             "index = BM25Index(['alpha beta', 'gamma delta', 'beta gamma'], settings_from()); "
             "ids, _ = index.search(['beta'], 2); print(sorted(ids[0].tolist()), 'jax' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = run_process([sys.executable, "-c", probe], env=env, check=True)
    assert out.stdout.split() == ["[0,", "2]", "False"]
