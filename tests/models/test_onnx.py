"""ONNX export (`models.export --onnx`) and ONNX Runtime compute: the layout sentence-transformers' ONNX backend
reads, and the PyTorch model's embeddings (within 1e-4) through a Dense head, CLS pooling and a query prefix.

all-MiniLM-L6-v2 through ONNX Runtime against sentence-transformers is checked by tests/test_benchmarks.py.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from tests.models.test_bi_encoder import change_weights
from twinfold.models import BiEncoder, EncoderSettings
from twinfold.models.head import Dense
from twinfold.models.onnx import ONNX_DIR, ONNX_FILES, OnnxEncoder

TEXTS = ["a", "gene expression in mice", "the cell divides " * 60, "x y", "Tokens: 1, 2, 3!"]  # one past max_length


@pytest.fixture(scope="module")
def exported(tiny_bert_path, tmp_path_factory):
    """The tiny BERT with CLS pooling, a 128 -> 64 Dense head and a query prefix, exported with --onnx-int8."""
    from transformers import AutoModel, AutoTokenizer

    from twinfold.models.export import main

    torch.manual_seed(0)
    model = BiEncoder(AutoModel.from_pretrained(tiny_bert_path), AutoTokenizer.from_pretrained(tiny_bert_path),
                      EncoderSettings(pooling="cls", prompts={"query": "query: "}), head=nn.Sequential(Dense(128, 64)))
    src, dst = tmp_path_factory.mktemp("onnx-src") / "model", tmp_path_factory.mktemp("onnx") / "model"
    model.save_pretrained(src)
    assert main([str(src), str(dst), "--onnx-int8"]) == 0
    return dst


def test_export_writes_the_encoder_in_the_layout_of_sentence_transformers_onnx_backend(exported):
    import onnx

    assert sorted(p.name for p in (exported / ONNX_DIR).iterdir()) == sorted(ONNX_FILES.values())
    manifest = json.loads((exported / "twinfold-manifest.json").read_text())
    assert {f"{ONNX_DIR}/{name}" for name in ONNX_FILES.values()} <= set(manifest["files"])
    graph = onnx.load(exported / ONNX_DIR / "model.onnx").graph

    def signature(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    axes = ["batch_size", "sequence_length"]
    # what optimum's ORTModelForFeatureExtraction feeds and reads
    assert signature(graph.input) == [(name, onnx.TensorProto.INT64, axes)
                                      for name in ("input_ids", "attention_mask", "token_type_ids")]
    assert signature(graph.output) == [("last_hidden_state", onnx.TensorProto.FLOAT, axes + [128])]


@pytest.mark.parametrize("kind", ["query", "document"])
def test_onnx_compute_gives_the_pytorch_embeddings(exported, kind):
    model = BiEncoder.from_pretrained(exported)
    assert model.settings.pooling == "cls" and model.dim == 64
    for dim in (None, 32):
        torch_emb = model.encode(TEXTS, batch_size=2, kind=kind, dim=dim)
        onnx_emb = model.encode(TEXTS, batch_size=2, kind=kind, dim=dim, compute="onnx")
        assert np.abs(onnx_emb - torch_emb).max() <= 1e-4
        int8_emb = model.encode(TEXTS, batch_size=2, kind=kind, dim=dim, compute="onnx-int8")
        assert (int8_emb * torch_emb).sum(1).min() > 0.999
        assert np.abs(int8_emb - torch_emb).max() > 1e-4  # really the int8 graph
    assert isinstance(model._compute_runner("onnx").encoder, OnnxEncoder)
    assert len({model.fingerprint(c) for c in ("float32", "onnx", "onnx-int8")}) == 3


def test_onnx_compute_of_an_unpadded_model_feeds_the_file_padded_inputs(exported):
    """A model that packs its texts (`unpad=True`) still gives ONNX Runtime the padded inputs its file takes."""
    unpadded = BiEncoder.from_pretrained(exported, unpad=True)
    assert unpadded.padder.packed
    np.testing.assert_allclose(unpadded.encode(TEXTS, batch_size=2, compute="onnx"),
                               BiEncoder.from_pretrained(exported).encode(TEXTS, batch_size=2, compute="onnx"),
                               atol=1e-6)


def test_onnx_compute_runs_the_folders_file_and_exports_again_once_the_weights_change(exported, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    # the float32 file replaced by the int8 one: what compute="onnx" gives shows which file it ran
    shutil.copy(folder / ONNX_DIR / ONNX_FILES["onnx-int8"], folder / ONNX_DIR / ONNX_FILES["onnx"])
    model = BiEncoder.from_pretrained(folder)
    assert np.array_equal(model.encode(TEXTS, compute="onnx"), model.encode(TEXTS, compute="onnx-int8"))
    change_weights(model, "fused_adamw")  # as training does
    # the folder's files are stale now: the current weights are exported and run
    assert np.abs(model.encode(TEXTS, compute="onnx") - model.encode(TEXTS)).max() <= 1e-4


def test_sentence_transformers_onnx_backend_gives_the_pytorch_embeddings(exported):
    """Needs optimum-onnx, which pins transformers < 4.58 and so is not in the dev extra (see docs/inference.md)."""
    pytest.importorskip("optimum.onnxruntime")
    from sentence_transformers import SentenceTransformer

    model = BiEncoder.from_pretrained(exported)
    float32 = SentenceTransformer(str(exported), backend="onnx", model_kwargs={"file_name": ONNX_FILES["onnx"]})
    int8 = SentenceTransformer(str(exported), backend="onnx", model_kwargs={"file_name": ONNX_FILES["onnx-int8"]})
    assert np.abs(float32.encode_query(TEXTS) - model.encode(TEXTS, kind="query")).max() <= 1e-4
    assert np.abs(float32.encode_document(TEXTS) - model.encode(TEXTS)).max() <= 1e-4
    assert np.abs(int8.encode_document(TEXTS) - model.encode(TEXTS, compute="onnx-int8")).max() <= 1e-4
