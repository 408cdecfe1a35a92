"""The forgetting guard: `eval.general` sets scored for the base and the final model in metrics.jsonl, the report,
twinfold.json and the model card, with a warning for a score that fell more than `eval.general_tolerance`."""
import json

import pytest

from tests.builders import small_beir, small_sts
from tests.helpers import SMOKE, recipe_args, records, train_in_process
from twinfold.models import BiEncoder
from twinfold.train.config import ConfigError, load_config
from twinfold.train.evaluate import GeneralEvaluator


def test_general_sets_are_scored_for_base_and_final_everywhere_with_a_warning_when_they_fall(
        tmp_path, tiny_bert_path, data_dir):
    sts = small_sts(data_dir / "stsb" / "test.tsv", tmp_path / "sts.tsv")
    beir = small_beir(data_dir / "scifact-nano", tmp_path / "beir")
    out = tmp_path / "run"
    result = train_in_process(recipe_args(out, f"eval.data={beir}", f"eval.general=[{sts},{beir}]",
                                          "eval.general_tolerance=0", "train.save_steps=null", "train.lr=1e-3",
                                          tiny=tiny_bert_path))
    assert result.returncode == 0, result.stderr[-3000:]
    general = [m["general"] for m in records(out) if "general" in m]
    assert [r["model"] for r in general[0]] == ["base", "base"] and len(general) == 2
    results = general[1]
    assert [(r["data"], r["metric"]) for r in results] == [(str(sts), "sts_spearman"), (str(beir), "ndcg@10")]
    base = BiEncoder.from_pretrained(tiny_bert_path, max_length=32)
    final = BiEncoder.from_pretrained(out / "final")
    for r, first in zip(results, general[0]):
        evaluator = GeneralEvaluator(r["data"])
        assert r["base"] == first["score"] == pytest.approx(evaluator(base), abs=1e-6)
        assert r["final"] == pytest.approx(evaluator(final), abs=1e-6)
        assert r["change"] == r["final"] - r["base"] and r["fell_beyond_tolerance"] == (r["final"] < r["base"])
        warning = (f"eval.general: {r['data']} ({r['metric']}) fell from {r['base']:.4f} (base) to "
                   f"{r['final']:.4f} (final), more than eval.general_tolerance 0")
        assert (warning in result.stderr) == r["fell_beyond_tolerance"]
    recorded = {"tolerance": 0.0, "results": results}
    assert json.loads((out / "final" / "twinfold.json").read_text())["general"] == recorded
    assert json.loads((out / "eval" / "report.json").read_text())["info"]["general"] == recorded
    for text in ((out / "eval" / "report.md").read_text(), (out / "final" / "README.md").read_text()):
        assert "## General sets (forgetting)" in text
        assert f"| `{sts}` | sts_spearman | {results[0]['base']:.4f} | {results[0]['final']:.4f} |" in text


@pytest.mark.parametrize("override, message", [
    ("eval.general_tolerance=-0.1", "eval.general_tolerance: -0.1 must not be negative"),
    ("eval.general=[/no/such/set]", "eval.general[0]: /no/such/set does not exist (an STS file or a BEIR folder)"),
    ("eval.general_split=dev", "eval.general[0]: the BEIR folder {nano} has no qrels/dev.tsv (eval.general_split)"),
    ("eval.general_tolerence=0.1",
     "unknown config key 'eval.general_tolerence'; did you mean 'eval.general_tolerance'?"),
    ("eval.general_tolerance=much", "eval.general_tolerance: expected float, got 'much'"),
])
def test_general_keys_are_checked_like_every_key(override, message, data_dir):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [f"eval.general=[{data_dir / 'scifact-nano'}]", override])
    assert str(e.value) == message.format(nano=data_dir / "scifact-nano")


def test_a_general_key_in_a_recipe_must_be_a_list(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMOKE.read_text().replace("  data: null", "  data: null\n  general: {sts: x}"))
    with pytest.raises(ConfigError, match=r"^eval.general: expected a list, got \{'sts': 'x'\}$"):
        load_config(recipe)
