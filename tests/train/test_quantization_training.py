"""A run trained for binary and int8 search: the loss it builds, and what the export and the report record."""
import json

from tests.helpers import SMOKE, records, run_train
from twinfold.losses import InfoNCE, Matryoshka, Quantized
from twinfold.train.config import load_config
from twinfold.train.loop import build_loss


def test_the_terms_sit_inside_matryoshka_at_the_dims_named():
    cfg = load_config(SMOKE, ["loss.quantization={binary: 1.0, int8: 0.5, dims: [128]}"])
    loss = build_loss(cfg)
    assert isinstance(loss, Matryoshka) and loss.dims == [384, 128]
    assert isinstance(loss.inner, Quantized) and isinstance(loss.inner.inner, InfoNCE)
    assert (loss.inner.binary, loss.inner.int8, loss.inner.dims, loss.inner.estimator) == (1.0, 0.5, [128], "ste")
    assert isinstance(build_loss(load_config(SMOKE, [])).inner, InfoNCE)  # off unless asked for


def test_run_records_what_it_was_trained_for_and_the_rescoring_depth(tmp_path, tiny_bert_path, data_dir):
    out = run_train(tmp_path, "qat", "loss.quantization={binary: 1.0, int8: 0.5, dims: [64]}",
                    "loss.learnable_temperature=true", "train.log_steps=1", "train.save_steps=null",
                    f"eval.data={data_dir / 'scifact-nano'}", "eval.precisions=[float32,int8,binary]",
                    "eval.rescore_multiplier=3", tiny=tiny_bert_path)
    meta = json.loads((out / "final" / "twinfold.json").read_text())
    assert meta["training"]["loss"]["quantization"] == {"binary": 1.0, "int8": 0.5, "alignment": 0.0, "dims": [64],
                                                       "estimator": "ste", "rotation_steps": 0}
    assert meta["eval"]["rescore_multiplier"] == 3 and max(meta["eval"]["k_values"]) == 100
    card = (out / "final" / "README.md").read_text()
    assert ("inside Matryoshka [128, 64]; trained for search over the documents' sign bits (weight 1.0) and int8 "
            "codes (weight 0.5) at dims [64], ste estimator") in card
    note = "the 300 nearest documents per query (rescore multiplier 3 x top 100) rescored with the float32 query"
    assert note in card and note in (out / "eval" / "report.md").read_text()
    steps = [r for r in records(out) if "loss" in r]
    assert len(steps) == 4 and all(r["temperature"] > 0 for r in steps)  # the temperature is found inside the terms
