"""Query prompts in training and evaluation: a task instruction per training dataset (by prompt name or as text),
part of the token cache key, and one for the queries of an evaluation."""
import json

import pytest

from tests.builders import pairs_from_texts
from twinfold.models import BiEncoder
from twinfold.train.config import ConfigError, load_config
from twinfold.train.data.loader import dataset_tokenizers
from twinfold.train.data.pairs import load_pairs, tokenize_pairs
from twinfold.train.eval.beir import load_beir
from twinfold.train.evaluate import RetrievalEvaluator, main
from twinfold.train.loop import RunState, run_info

INSTRUCT = "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery: "


@pytest.fixture
def prompted_path(tiny_bert_path, tmp_path):
    """The tiny BERT saved by sentence-transformers with task prompts (as e5-mistral ships them)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    SentenceTransformer(modules=[Transformer(str(tiny_bert_path), max_seq_length=64), Pooling(128, "mean")],
                        device="cpu", prompts={"query": "query: ", "sts_query": "Instruct: Retrieve semantically "
                                               "similar text.\nQuery: "}).save(str(tmp_path / "st"))
    return tmp_path / "st"


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"q": f"claim {i}", "d": f"abstract {i} about cells"}) + "\n" for i in range(6)))
    return path


def recipe(tmp_path, pairs, model, datasets: str, extra: str = ""):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model:\n  name_or_path: {model}\ndata:\n  train:\n{datasets}{extra}")
    return path


def entry(pairs, prompt_line: str = "") -> str:
    return f"    - path: {pairs}\n      columns: {{q: anchor, d: positive}}\n" + \
        (f"      {prompt_line}\n" if prompt_line else "")


def test_each_dataset_tokenizes_its_anchors_with_its_own_prompt(tmp_path, pairs, prompted_path):
    path = recipe(tmp_path, pairs, prompted_path, entry(pairs, "query_prompt_name: sts_query")
                  + entry(pairs, f"query_prompt: {json.dumps(INSTRUCT)}") + entry(pairs))
    cfg = load_config(path)
    model = BiEncoder.from_pretrained(prompted_path)
    tokenizers = dataset_tokenizers(cfg, model)
    assert [t.query_prefix for t in tokenizers] == [model.settings.prompts["sts_query"], INSTRUCT, "query: "]
    assert {t.document_prefix for t in tokenizers} == {""}

    ds = load_pairs(cfg.data.train[0])
    cache = tmp_path / "cache"
    plain, instructed = (tokenize_pairs(ds, t, cache) for t in (tokenizers[2], tokenizers[1]))
    assert len(list((cache / "tokens").iterdir())) == 2  # the prompt is part of the cache key
    rows = instructed.rows([0, 1])
    assert rows["anchor"][0] == model.tokenizer([INSTRUCT + "claim 0", INSTRUCT + "claim 1"])["input_ids"]
    assert rows["positive"] == plain.rows([0, 1])["positive"]
    recorded = run_info(cfg, [ds] * 3, RunState(step=1), [], {})["training"]["data"]  # for twinfold.json and the card
    assert [{k: v for k, v in d.items() if k.startswith("query")} for d in recorded] == \
        [{"query_prompt_name": "sts_query"}, {"query_prompt": INSTRUCT}, {}]


def test_prompt_errors_name_the_config_key(tmp_path, pairs, prompted_path):
    both = entry(pairs, "query_prompt_name: sts_query\n      query_prompt: 'Query: '")
    with pytest.raises(ConfigError, match=r"data.train\[0\]: query_prompt_name 'sts_query' and query_prompt 'Query: ' "
                                          "both set"):
        load_config(recipe(tmp_path, pairs, prompted_path, both))
    with pytest.raises(ConfigError, match="eval: query_prompt_name 'a' and query_prompt 'b' both set"):
        load_config(recipe(tmp_path, pairs, prompted_path, entry(pairs)),
                    ["eval.query_prompt_name=a", "eval.query_prompt=b"])
    model = BiEncoder.from_pretrained(prompted_path)
    unknown = load_config(recipe(tmp_path, pairs, prompted_path, entry(pairs) + entry(pairs, "query_prompt_name: nq")))
    with pytest.raises(ConfigError, match=r"data.train\[1\].query_prompt_name: prompt 'nq' is not one of the model's "
                                          "prompts"):
        dataset_tokenizers(unknown, model)
    with pytest.raises(ConfigError, match="eval.query_prompt_name: prompt 'nq' is not one of"):
        dataset_tokenizers(load_config(recipe(tmp_path, pairs, prompted_path, entry(pairs)),
                                       ["eval.query_prompt_name=nq"]), model)


@pytest.fixture
def beir(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = ["cells divide by mitosis", "proteins fold in the cell", "mice have an immune response", "stars burn"]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                                 for i, t in enumerate(docs)))
    queries = ["how do cells divide", "protein folding", "immune response of mice"]
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(queries)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n"
                                                                                        for i in range(3)))
    return folder


def test_evaluation_encodes_the_queries_with_the_named_prompt(beir, prompted_path, tmp_path):
    data = load_beir(beir)
    model = BiEncoder.from_pretrained(prompted_path)
    prompted = RetrievalEvaluator(data, query_prompt_name="sts_query", k_values=(1,), out_dir=tmp_path / "a")
    rows = prompted(model, "m")
    model.settings.query_prefix = model.settings.prompts["sts_query"]  # the same queries, by the model's prefix
    reference = RetrievalEvaluator(data, k_values=(1,), out_dir=tmp_path / "b")(model, "m")
    assert [r["ndcg@10"] for r in rows] == [r["ndcg@10"] for r in reference]
    assert (tmp_path / "a" / "runs" / "m.128.float32.trec").read_text() == \
        (tmp_path / "b" / "runs" / "m.128.float32.trec").read_text()
    RetrievalEvaluator(data, k_values=(1,), out_dir=tmp_path / "c")(BiEncoder.from_pretrained(prompted_path), "m")
    assert (tmp_path / "c" / "runs" / "m.128.float32.trec").read_text() != \
        (tmp_path / "a" / "runs" / "m.128.float32.trec").read_text()

    out = tmp_path / "report"
    assert main(["--model", str(prompted_path), "--data", str(beir), "--query-prompt-name", "sts_query",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["info"]["query_prompt_name"] == "sts_query"
    assert report["results"][0]["ndcg@10"] == rows[0]["ndcg@10"]


def test_mining_encodes_the_anchors_with_the_datasets_prompt(tiny_bert_path):
    import torch

    from twinfold.train.config import DatasetConfig, HardNegativesConfig
    from twinfold.train.mine import MemoEncoder, mine, provenance_of

    encoder = MemoEncoder(BiEncoder.from_pretrained(tiny_bert_path))
    docs = {"protein folding yeast cells": 0.9, "protein folding yeast chaperones": 0.8, "yeast genetics": 0.3}
    # documents at these cosines to (1, 0); the anchor is (1, 0) without the prompt and (0, 1) with it, where the
    # cosines are sqrt(1 - c^2): 0.44, 0.60, 0.95
    encoder.remember(list(docs), "document", torch.tensor([[c, (1 - c * c) ** 0.5] for c in docs.values()]))
    encoder.remember(["protein folding yeast"], "query", torch.tensor([[1.0, 0.0]]))
    encoder.remember(["protein folding yeast"], "query", torch.tensor([[0.0, 1.0]]), prompt=INSTRUCT)
    pairs = pairs_from_texts("p", ["protein folding yeast"], ["protein folding yeast cells"], [[]])
    settings = HardNegativesConfig(num_negatives=1, range_max=3, max_score_ratio=None)
    assert mine(pairs, settings, encoder, list(docs)).negatives == [["protein folding yeast chaperones"]]
    assert mine(pairs, settings, encoder, list(docs), query_prompt=INSTRUCT).negatives == [["yeast genetics"]]
    ds = DatasetConfig(path="x.jsonl", hard_negatives=settings, query_prompt=INSTRUCT)
    assert provenance_of(ds, "m", "f", INSTRUCT)["settings"]["query_prompt"] == INSTRUCT
    assert "query_prompt" not in provenance_of(ds, "m", "f")["settings"]
