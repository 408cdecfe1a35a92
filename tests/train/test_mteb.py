"""MTEB scores an exported twinfold model as `python -m twinfold.train.evaluate` does: nDCG@10 equal to 1e-4 on a
retrieval task that MTEB builds from a local BEIR folder (SciFact-nano), for all-MiniLM-L6-v2 and for a fine-tuned model
with query and document prefixes. MTEB reads the folder with its own code: the model through sentence-transformers
(prompts, max_seq_length, similarity from the export), documents as title + " " + text, ranking and metrics its own.
"""
import csv
import json
from pathlib import Path

import pytest

from tests.helpers import run_train
from twinfold.models import BiEncoder
from twinfold.train.evaluate import main as evaluate_main


def local_beir_task(folder: Path):
    """An MTEB retrieval task over a BEIR folder on disk (corpus.jsonl, queries.jsonl, qrels/test.tsv)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalBeir(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="LocalBeir", description=f"BEIR folder {folder}", type="Retrieval", category="t2t",
            modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
            dataset={"path": str(folder), "revision": "local"})

        def load_data(self, **kwargs):
            def rows(name):
                return [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]

            qrels = {}
            with open(folder / "qrels" / "test.tsv", newline="") as f:
                for row in csv.DictReader(f, delimiter="\t"):
                    qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
            corpus = Dataset.from_list([{"id": r["_id"], "title": r.get("title", ""), "text": r["text"]}
                                        for r in rows("corpus.jsonl")])
            queries = Dataset.from_list([{"id": r["_id"], "text": r["text"]} for r in rows("queries.jsonl")])
            self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries, "relevant_docs": qrels,
                                                 "top_ranked": None}}}
            self.data_loaded = True

    return LocalBeir()


def mteb_ndcg_at_10(model_folder: Path, data: Path) -> float:
    import mteb
    from sentence_transformers import SentenceTransformer

    result = mteb.evaluate(SentenceTransformer(str(model_folder)), local_beir_task(data), cache=None,
                           encode_kwargs={"batch_size": 64}, show_progress_bar=False)
    (task,) = result.task_results
    return task.scores["test"][0]["ndcg_at_10"]


def twinfold_ndcg_at_10(model_folder: Path, data: Path, out: Path) -> float:
    assert evaluate_main(["--model", str(model_folder), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    (row,) = json.loads((out / "report.json").read_text())["results"]
    return row["ndcg@10"]


@pytest.mark.parametrize("max_length, expected", [
    (64, 0.7418),  # texts cut at 64 tokens (stored in the export, read by both): a quarter of the full run's time
    pytest.param(None, 0.8025, marks=pytest.mark.slow),  # the model's own 256 tokens
])
def test_mteb_gives_twinfolds_ndcg_for_exported_minilm(minilm_path, data_dir, tmp_path, max_length, expected):
    folder = BiEncoder.from_pretrained(minilm_path, max_length=max_length).save_pretrained(tmp_path / "minilm")
    nano = data_dir / "scifact-nano"
    ours = twinfold_ndcg_at_10(folder, nano, tmp_path / "eval")
    assert ours == pytest.approx(expected, abs=0.005)  # measured
    assert mteb_ndcg_at_10(folder, nano) == pytest.approx(ours, abs=1e-4)


def test_mteb_gives_twinfolds_ndcg_for_a_fine_tuned_export_with_prefixes(tiny_bert_path, data_dir, tmp_path):
    run = run_train(tmp_path, "run", "train.max_steps=2", "model.query_prefix=query: ",
                    "model.document_prefix=passage: ", tiny=tiny_bert_path)
    folder = run / "final"
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"] == {
        "query": "query: ", "document": "passage: "}
    nano = data_dir / "scifact-nano"
    ours = twinfold_ndcg_at_10(folder, nano, tmp_path / "eval")
    assert ours == pytest.approx(0.1816, abs=0.005)  # measured: a real ranking, not ties
    assert mteb_ndcg_at_10(folder, nano) == pytest.approx(ours, abs=1e-4)
