"""Named prompts: every prompt of a sentence-transformers folder is kept on load and export, shown in the card, and
encodes as sentence-transformers' `encode(prompt_name=...)` does."""
import json

import numpy as np
import pytest

from twinfold.models import BiEncoder
from twinfold.models.bi_encoder import EncoderSettings

TEXTS = ["a", "short text", "a much longer text about proteins, cells and the immune response of mice"]
# the task prompts e5-mistral-7b-instruct and EmbeddingGemma ship (config_sentence_transformers.json)
PROMPT_SETS = {
    "e5-mistral": ({"web_search_query": "Instruct: Given a web search query, retrieve relevant passages that "
                                        "answer the query\nQuery: ",
                    "sts_query": "Instruct: Retrieve semantically similar text.\nQuery: ",
                    "bitext_query": "Instruct: Retrieve parallel sentences.\nQuery: "}, None),
    "embeddinggemma": ({"query": "task: search result | query: ", "document": "title: none | text: ",
                        "Classification": "task: classification | query: ",
                        "Clustering": "task: clustering | query: ", "STS": "task: sentence similarity | query: "},
                       None),
    "default-and-passage": ({"retrieval": "Represent this: ", "passage": "passage: "}, "retrieval"),
}


def st_folder(base, prompts, default, folder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    model = SentenceTransformer(modules=[Transformer(str(base), max_seq_length=64), Pooling(128, "mean"), Normalize()],
                                device="cpu", prompts=prompts, default_prompt_name=default)
    model.save(str(folder))
    return model


def prompt_config(folder):
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    return config["prompts"], config["default_prompt_name"]


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_named_prompts_survive_load_and_export_and_are_in_the_card(name, tiny_bert_path, tmp_path):
    prompts, default = PROMPT_SETS[name]
    st_folder(tiny_bert_path, prompts, default, tmp_path / "st")
    saved = prompt_config(tmp_path / "st")  # sentence-transformers adds empty "query" and "document" prompts
    assert saved == ({"query": "", "document": "", **prompts}, default)
    model = BiEncoder.from_pretrained(tmp_path / "st")
    assert (model.settings.prompts, model.settings.default_prompt_name) == saved
    model.save_pretrained(tmp_path / "export")
    assert prompt_config(tmp_path / "export") == saved
    again = BiEncoder.from_pretrained(tmp_path / "export")
    assert (again.settings.prompts, again.settings.default_prompt_name) == saved
    card = (tmp_path / "export" / "README.md").read_text()
    for prompt_name, text in prompts.items():  # a | inside a table cell is escaped
        assert f"| `{prompt_name}` | `{text!r}` |".replace(" | query", " \\| query").replace(" | text", " \\| text") \
            in card


def test_query_and_document_prefixes_follow_sentence_transformers_choice(tiny_bert_path, tmp_path):
    st_folder(tiny_bert_path, *PROMPT_SETS["default-and-passage"], tmp_path / "st")
    model = BiEncoder.from_pretrained(tmp_path / "st")
    assert (model.settings.query_prefix, model.settings.document_prefix) == ("", "")  # the empty ones it added
    model.settings.query_prefix = "q: "
    model.settings.document_prefix = "doc: "
    assert model.settings.prompts == {"query": "q: ", "document": "doc: ", **PROMPT_SETS["default-and-passage"][0]}
    settings = EncoderSettings(prompts={"retrieval": "Represent this: ", "passage": "passage: "},
                               default_prompt_name="retrieval")  # a folder written without "query" / "document"
    assert (settings.query_prefix, settings.document_prefix) == ("Represent this: ", "passage: ")
    settings.document_prefix = "doc: "  # replaces the prompt encode_document picks
    assert settings.prompts == {"retrieval": "Represent this: ", "passage": "doc: "}


def test_a_default_prompt_name_that_is_not_a_prompt_is_refused(tiny_bert_path, tmp_path):
    from twinfold.models import ModelLoadError

    st_folder(tiny_bert_path, {"query": "q: "}, None, tmp_path / "st")
    file = tmp_path / "st" / "config_sentence_transformers.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "default_prompt_name": "missing"}))
    with pytest.raises(ModelLoadError, match="config_sentence_transformers.json: default_prompt_name 'missing'"):
        BiEncoder.from_pretrained(tmp_path / "st")


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_encoding_with_a_named_prompt_equals_sentence_transformers(name, tiny_bert_path, tmp_path):
    st = st_folder(tiny_bert_path, *PROMPT_SETS[name], tmp_path / "st")
    model = BiEncoder.from_pretrained(tmp_path / "st")
    for prompt_name in st.prompts:
        want = st.encode(TEXTS, prompt_name=prompt_name)
        for kind in ("query", "document"):  # the prompt replaces the kind's prefix
            assert np.abs(model.encode(TEXTS, kind=kind, prompt_name=prompt_name) - want).max() < 1e-5
    literal = "Instruct: Given a claim, find documents that refute it\nQuery: "
    assert np.abs(model.encode(TEXTS, prompt=literal) - st.encode(TEXTS, prompt=literal)).max() < 1e-5
    with pytest.raises(ValueError, match="prompt 'nope' is not one of the model's prompts"):
        model.encode(TEXTS, prompt_name="nope")
    with pytest.raises(ValueError, match="not both"):
        model.encode(TEXTS, prompt_name="query", prompt=literal)


def test_encode_command_with_a_prompt_records_it_and_updates_with_it(tiny_bert_path, tmp_path, capsys):
    from twinfold.models import EmbeddingSet
    from twinfold.models.encode import main

    prompts, default = PROMPT_SETS["embeddinggemma"]
    st_folder(tiny_bert_path, prompts, default, tmp_path / "st")
    model = BiEncoder.from_pretrained(tmp_path / "st")
    rows = [{"_id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(tmp_path / "st"), "--no-progress"]
    out = tmp_path / "emb.safetensors"
    assert main([*args, "--input", str(docs), "--output", str(out), "--prompt", "Clustering"]) == 0
    written = EmbeddingSet.load(out)
    assert written.prompt == prompts["Clustering"]
    np.testing.assert_allclose(written.embeddings, model.encode(TEXTS, prompt_name="Clustering"), atol=1e-6)
    rows[1]["text"] = "a changed text"
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*args, "--input", str(docs), "--update", str(out)]) == 0
    updated = EmbeddingSet.load(out)
    assert updated.prompt == prompts["Clustering"]
    np.testing.assert_allclose(updated.embeddings, model.encode([r["text"] for r in rows], prompt_name="Clustering"),
                               atol=1e-6)
    capsys.readouterr()
    assert main([*args, "--input", str(docs), "--output", str(out), "--prompt-name", "nope"]) == 2
    err = capsys.readouterr().err
    assert "error: prompt 'nope' is not one of the model's prompts (" in err and "'Clustering'" in err


def test_card_names_the_query_prompt_of_each_training_dataset(tiny_bert_path, tmp_path):
    data = [{"name": "claims", "pairs": 9, "query_prompt": "Instruct: find\nQuery: "},
            {"name": "nli", "pairs": 4, "query_prompt_name": "sts_query"}, {"name": "plain", "pairs": 2}]
    BiEncoder.from_pretrained(tiny_bert_path).save_pretrained(tmp_path / "m", info={"training": {"data": data}})
    card = (tmp_path / "m" / "README.md").read_text()
    assert "- data: claims, 9 pairs, query prompt 'Instruct: find\\nQuery: '\n" in card
    assert "- data: nli, 4 pairs, query prompt `sts_query`\n" in card and "- data: plain, 2 pairs\n" in card
