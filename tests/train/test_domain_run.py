"""A training run with mined hard negatives on a tiny BERT: the mined file feeds the data path, the checks reach
the report, the exported card carries report.json's metrics, and 2 processes train on the same mined data."""
import json

import yaml

from tests.helpers import max_diff, run_train, weights

MINED = ("data.train=[{{path: {}, "
         "hard_negatives: {{num_negatives: 2, range_min: 1, range_max: 20, max_score_ratio: null}}}}]")


def test_run_with_mined_negatives_reports_checks_and_exports_a_card(tmp_path, tiny_bert_path, data_dir):
    from huggingface_hub import ModelCard

    common = (MINED.format(data_dir / "scifact-train-pairs" / "train.jsonl"), "model.dropout=0.0",
              "train.save_steps=null", "train.lr=2e-4")
    out = run_train(tmp_path, "one", *common, f"eval.data={data_dir / 'scifact-nano'}", "eval.bm25=true",
                    "eval.precisions=[float32,binary]", tiny=tiny_bert_path)
    (mined,) = (out / "mined").glob("*.jsonl")
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    assert len(rows) == 919 and all(set(r) == {"anchor", "positive", "negative_1", "negative_2"} for r in rows)
    meta = json.loads((out / "final" / "twinfold.json").read_text())
    (provenance,) = meta["training"]["hard_negatives"]
    assert provenance["settings"]["range_min"] == 1 and provenance["rows_out"] == 919
    assert meta["training"]["data"] == [{"name": "train", "pairs": 919, "negatives_per_pair": 2}]
    (check,) = meta["training"]["leakage"]
    assert check["dataset"] == "train" and check["eval_overlap"]["exact"] > 0  # SciFact: abstracts in both splits
    assert "## Training data against the eval set" in (out / "eval" / "report.md").read_text()

    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["info"]["leakage"] == meta["training"]["leakage"]
    final = {f"{r['dim']}d-{r['precision']}": r for r in report["results"] if r["model"] == "final"}
    card = ModelCard.load(out / "final" / "README.md")
    got = {(r.metric_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {(c, k.replace("@", "_at_")): r[k] for c, r in final.items()
                   for k in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")}
    assert len(final) == 4  # 128 and 64 dims x float32 and binary
    header = (out / "final" / "README.md").read_text().split("\n---\n", 1)[0]
    assert yaml.safe_load(header[4:])["base_model"] == str(tiny_bert_path)

    two = run_train(tmp_path, "two", *common, tiny=tiny_bert_path, processes=2)
    assert max_diff(weights(out / "final"), weights(two / "final")) < 1e-5
