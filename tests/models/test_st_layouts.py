"""sentence-transformers layouts: twinfold computes each as sentence-transformers does, or refuses to load it.

Each layout is a tiny model built with sentence-transformers itself (poolings, Dense heads, Normalize on/off,
prompts, left padding); zero silent differences: embeddings within 1e-5, or a ModelLoadError naming the cause.
"""
import json
import re
import shutil

import numpy as np
import pytest
import torch

from twinfold.models import BiEncoder, ModelLoadError

TEXTS = ["a", "short text", "a much longer text about proteins, cells and the immune response of mice",
         "mid length sentence here", "Tokens: 1, 2, 3!"]


@pytest.fixture(scope="module")
def left_padded_path(tiny_bert_path, tmp_path_factory):
    """The tiny BERT with a tokenizer that pads on the left (as decoder-style embedders do)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-left")
    for f in tiny_bert_path.iterdir():
        shutil.copy(f, path / f.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_path)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(path)
    return path


def dense(i, o, activation="Tanh", **kw):
    from sentence_transformers.base.modules import Dense

    torch.manual_seed(i + o)
    act = None if activation is None else getattr(torch.nn, activation)()
    return Dense(i, o, activation_function=act, **kw)


def normalize():
    from sentence_transformers.base.modules import Normalize

    return Normalize()


def pooling(mode, **kw):
    from sentence_transformers.sentence_transformer.modules import Pooling

    return Pooling(128, mode, **kw)


# name -> (modules after the Transformer, SentenceTransformer kwargs, left padding)
SUPPORTED = {
    "mean": (lambda: [pooling("mean")], {}, False),
    "mean-normalize": (lambda: [pooling("mean"), normalize()], {}, False),
    "cls-normalize": (lambda: [pooling("cls"), normalize()], {}, False),
    "max": (lambda: [pooling("max")], {}, False),
    "mean_sqrt_len-normalize": (lambda: [pooling("mean_sqrt_len_tokens"), normalize()], {}, False),
    "weightedmean": (lambda: [pooling("weightedmean")], {}, False),
    "lasttoken-normalize": (lambda: [pooling("lasttoken"), normalize()], {}, False),
    "cls-dense128to64-tanh-normalize": (lambda: [pooling("cls"), dense(128, 64), normalize()], {}, False),
    "mean-dense-nobias-identity": (lambda: [pooling("mean"), dense(128, 64, None, bias=False)], {}, False),
    "mean-dense-gelu-dense-tanh-normalize": (
        lambda: [pooling("mean"), dense(128, 96, "GELU"), dense(96, 32), normalize()], {}, False),
    "max-dense-relu-residual-normalize": (
        lambda: [pooling("max"), dense(128, 128, "ReLU", use_residual=True), normalize()], {}, False),
    "mean-normalize-prompts": (lambda: [pooling("mean"), normalize()],
                               {"prompts": {"query": "query: ", "passage": "passage: "}}, False),
    "lasttoken-default-prompt-dot": (lambda: [pooling("lasttoken")],
                                     {"prompts": {"retrieval": "Represent this: "}, "default_prompt_name": "retrieval",
                                      "similarity_fn_name": "dot"}, False),
    "weightedmean-left-padded-dense-sigmoid-residual-normalize": (
        lambda: [pooling("weightedmean"), dense(128, 64, "Sigmoid", use_residual=True), normalize()], {}, True),
    "lasttoken-left-padded": (lambda: [pooling("lasttoken")], {}, True),
    "cls-left-padded-normalize": (lambda: [pooling("cls"), normalize()], {}, True),
}


def build(base, modules, kwargs, folder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer

    model = SentenceTransformer(modules=[Transformer(str(base), max_seq_length=64), *modules], device="cpu", **kwargs)
    model.save(str(folder))
    return model


def module_kinds(folder):
    return [m["type"].rpartition(".")[2] for m in json.loads((folder / "modules.json").read_text())]


@pytest.mark.parametrize("name", SUPPORTED)
def test_layout_loads_as_the_same_network_and_exports_back(name, tiny_bert_path, left_padded_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    modules, kwargs, left = SUPPORTED[name]
    st = build(left_padded_path if left else tiny_bert_path, modules(), kwargs, tmp_path / "st")
    ours = BiEncoder.from_pretrained(tmp_path / "st")
    # With left padding a BERT's states depend on the padding (absolute positions), so encode one text at a
    # time and compare one padded batch through both networks.
    batch, st_batch = (1, 1) if left else (2, 3)
    docs, queries = ours.encode(TEXTS, batch_size=batch), ours.encode(TEXTS, batch_size=batch, kind="query")
    assert docs.shape == (len(TEXTS), st.get_embedding_dimension())
    assert np.abs(docs - st.encode_document(TEXTS, batch_size=st_batch)).max() < 1e-5
    assert np.abs(queries - st.encode_query(TEXTS, batch_size=st_batch)).max() < 1e-5
    features = ours.tokenize(TEXTS)
    assert (features["attention_mask"][:, 0 if left else -1] == 0).any()  # padding on the side under test
    with torch.no_grad():
        ours.eval(), st.eval()
        torch.testing.assert_close(ours(**features), st(dict(features))["sentence_embedding"], atol=1e-5, rtol=0)

    ours.save_pretrained(tmp_path / "export")
    assert module_kinds(tmp_path / "export") == module_kinds(tmp_path / "st")
    again = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert again.similarity_fn_name == st.similarity_fn_name
    assert np.abs(again.encode_document(TEXTS, batch_size=st_batch) - docs).max() < 1e-5
    assert np.abs(again.encode_query(TEXTS, batch_size=st_batch) - queries).max() < 1e-5
    reloaded = BiEncoder.from_pretrained(tmp_path / "export")
    assert reloaded.fingerprint() == ours.fingerprint()


def test_dense_head_is_trained_and_fingerprinted(tiny_bert_path, tmp_path):
    build(tiny_bert_path, [pooling("cls"), dense(128, 64), normalize()], {}, tmp_path / "st")
    model = BiEncoder.from_pretrained(tmp_path / "st")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert model.dim == 64 and {"head.0.linear.weight", "head.0.linear.bias"} <= set(trained)
    before = model.fingerprint()
    with torch.no_grad():
        model.head[0].linear.weight[0, 0] += 1e-6
    assert model.fingerprint() != before
    features = model.tokenize(["one text", "another"])
    model(**features).sum().backward()
    assert model.head[0].linear.weight.grad.abs().sum() > 0


def edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def layernorm():
    from sentence_transformers.sentence_transformer.modules import LayerNorm

    return LayerNorm(128)


# name -> (modules, SentenceTransformer kwargs, edit of the saved folder, words the error must hold)
REFUSED = {
    "concatenated-poolings": (lambda: [pooling(("cls", "mean"))], {}, None, "cls + mean"),
    "include_prompt-false": (lambda: [pooling("mean", include_prompt=False)], {"prompts": {"query": "q: "}}, None,
                             "include_prompt"),
    "layernorm-module": (lambda: [pooling("mean"), layernorm()], {}, None, "LayerNorm"),
    "normalize-before-dense": (lambda: [pooling("mean"), normalize(), dense(128, 64)], {}, None, "Dense"),
    "custom-activation": (lambda: [pooling("mean"), dense(128, 64)], {},
                          lambda f: edit_json(f / "2_Dense" / "config.json", activation_function="mypkg.Swish"),
                          "mypkg.Swish"),
    "lowercasing": (lambda: [pooling("mean")], {},
                    lambda f: edit_json(f / "sentence_bert_config.json", do_lower_case=True), "do_lower_case"),
    "euclidean-similarity": (lambda: [pooling("mean")], {"similarity_fn_name": "euclidean"}, None, "euclidean"),
    "transformer-in-a-subfolder": (lambda: [pooling("mean")], {}, lambda f: move_transformer(f, "0_Transformer"),
                                   "Transformer at '0_Transformer'"),
}


def move_transformer(folder, sub):
    """The older layout: the Transformer's files in a subfolder named in modules.json."""
    (folder / sub).mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).rename(folder / sub / name)
    modules = json.loads((folder / "modules.json").read_text())
    modules[0]["path"] = sub
    (folder / "modules.json").write_text(json.dumps(modules))


@pytest.mark.parametrize("name", REFUSED)
def test_layout_twinfold_cannot_compute_is_refused_by_name(name, tiny_bert_path, tmp_path):
    modules, kwargs, edit, words = REFUSED[name]
    build(tiny_bert_path, modules(), kwargs, tmp_path / "st")
    if edit:
        edit(tmp_path / "st")
    with pytest.raises(ModelLoadError, match=re.escape(words)) as error:
        BiEncoder.from_pretrained(tmp_path / "st")
    assert "\n" not in str(error.value) and str(tmp_path / "st") in str(error.value)


def test_pooling_modes_by_hand():
    from twinfold.models.pooling import pool

    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, -4.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean_sqrt_len_tokens"), torch.tensor([[4.0, 2.0]]) / 2 ** 0.5)
    torch.testing.assert_close(pool(hidden, mask, "weightedmean"), torch.tensor([[(1 + 6) / 3, 4 / 3]]))
    torch.testing.assert_close(pool(hidden, mask, "lasttoken"), torch.tensor([[3.0, 2.0]]))
    left = torch.tensor([[0, 1, 1]])  # left padding: the first kept token is the second one
    torch.testing.assert_close(pool(hidden, left, "cls"), torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, left, "weightedmean"), torch.tensor([[(3 + 10) / 3, (2 - 8) / 3]]))
    torch.testing.assert_close(pool(hidden, left, "lasttoken"), torch.tensor([[5.0, -4.0]]))


class RunsACommand:
    """Pickles as a call to os.system: what a malicious pytorch_model.bin holds."""

    def __reduce__(self):
        import os

        return os.system, ("touch ran",)


def test_malicious_pickle_weights_of_a_dense_module_are_one_error_and_run_nothing(tiny_bert_path, tmp_path,
                                                                                  monkeypatch):
    build(tiny_bert_path, [pooling("mean"), dense(128, 64)], {}, tmp_path / "st")
    folder = tmp_path / "st" / "2_Dense"
    (folder / "model.safetensors").unlink()
    torch.save({"linear.weight": RunsACommand()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=re.escape(f"{folder / 'pytorch_model.bin'}: its pickle weights were "
                                                       "refused by the safe loader")) as error:
        BiEncoder.from_pretrained(tmp_path / "st", allow_pickle=True)
    assert "\n" not in str(error.value) and not (tmp_path / "ran").exists()
