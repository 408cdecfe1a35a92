"""The model card every export writes: Hugging Face front matter (parsed by huggingface_hub) and the body."""
import yaml

from twinfold.models import BiEncoder

ROWS = [
    {"model": "base", "dim": 128, "precision": "float32", "ndcg@10": 0.61, "mrr@10": 0.58, "recall@10": 0.7,
     "recall@100": 0.9, "map@100": 0.57, "storage_mb_per_million_docs": 512},
    {"model": "final", "dim": 128, "precision": "float32", "ndcg@10": 0.6712, "mrr@10": 0.63, "recall@10": 0.8,
     "recall@100": 0.95, "map@100": 0.62, "storage_mb_per_million_docs": 512},
    {"model": "final", "dim": 64, "precision": "binary", "ndcg@10": 0.5, "mrr@10": 0.45, "recall@10": 0.6,
     "recall@100": 0.8, "map@100": 0.44, "storage_mb_per_million_docs": 8},
    {"model": "bm25", "dim": None, "precision": "sparse", "ndcg@10": 0.6569, "mrr@10": 0.6, "recall@10": 0.78,
     "recall@100": 0.88, "map@100": 0.6, "storage_mb_per_million_docs": 900,
     "bm25": "k1 0.9, b 0.4, lowercase, English stopwords, no stemming"},
]
TRAINING = {"base_model": "sentence-transformers/all-MiniLM-L6-v2", "steps": 56, "batch_size": 32, "lr": 3e-5,
            "warmup_ratio": 0.1, "seed": 42, "loss": {"temperature": 0.05, "matryoshka_dims": [128, 64]},
            "data": [{"name": "scifact-train", "pairs": 900, "negatives_per_pair": 1}]}


def front_matter(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_card_of_a_trained_model_parses_and_carries_the_final_metrics(tiny_bert_path, tmp_path):
    from huggingface_hub import ModelCard

    model = BiEncoder.from_pretrained(tiny_bert_path, query_prefix="query: ")
    model.settings.matryoshka_dims = [128, 64]
    model.save_pretrained(tmp_path / "m", info={"training": TRAINING, "eval": {
        "data": "/data/scifact", "split": "test", "results": ROWS}})
    meta, body = front_matter(tmp_path / "m")
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (meta["library_name"], meta["pipeline_tag"]) == ("sentence-transformers", "sentence-similarity")
    assert "matryoshka" in meta["tags"] and meta["datasets"] == ["scifact-train"]

    card = ModelCard.load(tmp_path / "m" / "README.md")
    results = card.data.eval_results
    got = {(r.metric_config, r.metric_type): r.metric_value for r in results}
    want = {(f"{r['dim']}d-{r['precision']}", k.replace("@", "_at_")): r[k] for r in ROWS if r["model"] == "final"
            for k in ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")}
    assert got == want
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results} == \
        {("information-retrieval", "scifact", "test")}

    assert '| 128 | float32 | 0.6100 | 0.6712 | 0.6300 | 0.9500 | 512 MB |' in body
    assert '| 64 | binary | – | 0.5000 | 0.4500 | 0.8000 | 8.0 MB |' in body
    assert "BM25 on the same queries: nDCG@10 0.6569 (k1 0.9, b 0.4" in body
    assert 'SentenceTransformer("path/to/this/model", truncate_dim=64)' in body
    assert 'model.encode_query(["a question"])' in body and "'query: a question'" in body
    assert "| `query` | `'query: '` |" in body
    assert "Queries take the prefix 'query: '" in body
    assert "- data: scifact-train, 900 pairs, 1 hard negative(s) per pair" in body
    assert model.fingerprint() in body


def test_card_of_a_plain_export_has_no_model_index(tiny_bert_path, tmp_path):
    from twinfold.models.export import main

    assert main([str(tiny_bert_path), str(tmp_path / "out")]) == 0
    meta, body = front_matter(tmp_path / "out")
    assert "model-index" not in meta and "base_model" not in meta
    assert "No evaluation was recorded with this model." in body and "Queries take no prefix" in body
