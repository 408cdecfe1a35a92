"""scripts/fetch_data.py conversions, checked against the shared copies of the same data."""
import csv
import importlib.util
import json

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("fetch_data", REPO / "scripts" / "fetch_data.py")
fetch_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_data)


def test_beir_train_judgments_become_the_shared_pairs(data_dir):
    pairs = fetch_data.beir_pairs(data_dir / "scifact", "train")
    shared = [json.loads(line) for line in open(data_dir / "scifact-train-pairs" / "train.jsonl", encoding="utf-8")]
    assert len(pairs) == 919
    assert sorted((p["anchor"], p["positive"]) for p in pairs) == sorted((p["anchor"], p["positive"]) for p in shared)


def test_stsb_original_format_to_tsv(tmp_path):
    raw = "main-captions\tMSRvid\t2012test\t0001\t2.500\tA girl is styling her hair.\tA girl is brushing her hair.\n"
    rows = fetch_data.stsb_rows(raw)
    fetch_data.write_tsv(tmp_path / "test.tsv", rows)
    with open(tmp_path / "test.tsv", newline="", encoding="utf-8") as f:
        back = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert back == [{"sentence1": "A girl is styling her hair.", "sentence2": "A girl is brushing her hair.",
                     "score": "2.500"}]
