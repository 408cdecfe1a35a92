"""Last-token pooling and EOS: `append_eos` ends every text with the EOS token (short and truncated, in training
tokens and in encode), a tokenizer that does not end texts with EOS is warned about, and a Qwen3-like model whose
tokenizer appends EOS encodes as sentence-transformers does."""
import json

import numpy as np
import pytest
import torch

from tests.builders import count_truncated, pairs_from_texts
from twinfold.models import BiEncoder
from twinfold.train.data.pairs import tokenize_pairs

EOS, PAD = "<|endoftext|>", "<|pad|>"
CORPUS = ["proteins fold in the cell", "the immune response of mice", "a claim about cells and their division",
          "stars burn hydrogen", "short text"] * 20
TEXTS = ["a", "short text", "a much longer text about proteins, cells and the immune response of mice in the lab"]
MAX_LENGTH = 8


def qwen3_like(folder, eos_post_processor: bool):
    """A tiny random Qwen3 with a byte-level BPE tokenizer trained here, padding on the left; with
    `eos_post_processor` the tokenizer appends EOS to every text (as Qwen3-Embedding's does), else it does not (a base
    Qwen3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS, PAD],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if eos_post_processor:
        backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS}",
                                                               special_tokens=[(EOS, backend.token_to_id(EOS))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, padding_side="left",
                                        model_max_length=64)
    config = Qwen3Config(vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3Model(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_qwen3(tmp_path_factory):
    return qwen3_like(tmp_path_factory.mktemp("qwen3-base"), eos_post_processor=False)


@pytest.fixture(scope="module")
def embedding_qwen3(tmp_path_factory):
    return qwen3_like(tmp_path_factory.mktemp("qwen3-embedding"), eos_post_processor=True)


def test_append_eos_ends_short_and_truncated_texts_with_eos_in_training_tokens_and_encode(base_qwen3, tmp_path):
    model = BiEncoder.from_pretrained(base_qwen3, pooling="lasttoken", max_length=MAX_LENGTH, append_eos=True)
    eos = model.tokenizer.eos_token_id
    plain = model.tokenizer(TEXTS)["input_ids"]
    # with EOS: one token, exactly MAX_LENGTH tokens, and longer (cut)
    assert [len(x) for x in plain] == [1, MAX_LENGTH - 1, 49] and all(x[-1] != eos for x in plain)
    expected = [plain[0] + [eos], plain[1] + [eos], plain[2][:MAX_LENGTH - 1] + [eos]]
    assert model.token_ids(TEXTS) == expected
    assert model.text_tokenizer.lengths(TEXTS, "document") == [2, MAX_LENGTH, 50]
    assert count_truncated(model, TEXTS, "document") == 1

    features = model.tokenize(TEXTS)  # left padding: the last column is each text's last token
    assert features["input_ids"][:, -1].tolist() == [eos] * 3 and features["attention_mask"][:, -1].all()

    positives = [t + " again" for t in TEXTS]
    tokens = tokenize_pairs(pairs_from_texts("toy", TEXTS, positives), model.text_tokenizer, tmp_path / "cache")
    rows = tokens.rows([0, 1, 2])
    assert rows["anchor"][0] == expected and rows["positive"][0] == model.token_ids(positives)
    assert all(x[-1] == eos for x in rows["positive"][0])
    assert tokens.truncated == {"anchor": 1, "positive": count_truncated(model, positives, "document")}

    with torch.no_grad():
        by_hand = model.eval()(**model.padder(expected))  # the states of the EOS tokens
    np.testing.assert_allclose(model.encode(TEXTS, batch_size=2), by_hand.numpy(), atol=1e-6)
    without = BiEncoder.from_pretrained(base_qwen3, pooling="lasttoken", max_length=MAX_LENGTH)
    assert np.abs(without.encode(TEXTS) - by_hand.numpy()).max() > 1e-3  # without it, other tokens are pooled


def test_append_eos_is_stored_honoured_on_load_and_exported_for_sentence_transformers(base_qwen3, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = BiEncoder.from_pretrained(base_qwen3, pooling="lasttoken", max_length=MAX_LENGTH, append_eos=True)
    model.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "twinfold.json").read_text())["append_eos"] is True
    card = (tmp_path / "export" / "README.md").read_text()
    assert "each ends with the EOS token, kept when a text is truncated" in card
    again = BiEncoder.from_pretrained(tmp_path / "export")
    assert again.settings.append_eos and again.token_ids(TEXTS) == model.token_ids(TEXTS)
    assert again.fingerprint() == model.fingerprint()
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu")  # the saved tokenizer appends EOS itself
    assert np.abs(st.encode(TEXTS, batch_size=2) - model.encode(TEXTS, batch_size=2)).max() < 1e-5
    assert model.tokenizer("a")["input_ids"][-1] != model.tokenizer.eos_token_id  # the model's own is unchanged
    assert BiEncoder.from_pretrained(tmp_path / "export", append_eos=False).fingerprint() != model.fingerprint()
    assert model.text_tokenizer.fingerprint() != \
        BiEncoder.from_pretrained(tmp_path / "export", append_eos=False).text_tokenizer.fingerprint()


def test_last_token_pooling_warns_when_the_tokenizer_does_not_end_texts_with_eos(base_qwen3, embedding_qwen3,
                                                                                  caplog):
    with caplog.at_level("WARNING", logger="twinfold"):
        BiEncoder.from_pretrained(base_qwen3, pooling="lasttoken")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "does not end a text with its EOS token '<|endoftext|>'" in warnings[0]
    assert "model.append_eos: true" in warnings[0] and "\n" not in warnings[0]
    for quiet in (dict(path=embedding_qwen3, pooling="lasttoken"), dict(path=base_qwen3, pooling="mean"),
                  dict(path=base_qwen3, pooling="lasttoken", append_eos=True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="twinfold"):
            BiEncoder.from_pretrained(quiet.pop("path"), **quiet)
        assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_qwen3_like_model_whose_tokenizer_appends_eos_encodes_as_sentence_transformers(embedding_qwen3, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    instruct = "Instruct: find\nQuery: "
    st = SentenceTransformer(modules=[Transformer(str(embedding_qwen3), max_seq_length=32),
                                      Pooling(64, "lasttoken"), Normalize()], device="cpu",
                             prompts={"query": instruct, "document": ""})
    st.save(str(tmp_path / "st"))
    for append_eos in (None, True):  # the tokenizer already ends texts with EOS: appending changes nothing
        model = BiEncoder.from_pretrained(tmp_path / "st", append_eos=append_eos)
        ids = model.token_ids(TEXTS, "query")
        assert count_truncated(model, TEXTS, "query") == 1 and len(ids[2]) == 32  # the long text is cut...
        assert {x[-1] for x in ids} == {model.tokenizer.eos_token_id}  # ...and ends with EOS as the others do
        assert np.abs(model.encode(TEXTS, batch_size=2) - st.encode_document(TEXTS, batch_size=2)).max() < 1e-5
        assert np.abs(model.encode(TEXTS, kind="query") - st.encode_query(TEXTS)).max() < 1e-5
        assert np.abs(model.encode(TEXTS, prompt_name="query") - st.encode(TEXTS, prompt_name="query")).max() < 1e-5
