"""models.BiEncoder: parity with sentence-transformers, export round trips, quantisation, safe loading."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from twinfold.models import BiEncoder, EmbeddingSet, FingerprintMismatch, ModelLoadError, truncate
from twinfold.models.embeddings import similarity
from twinfold.models.pooling import POOLING_MODES
from twinfold.models.quantize import calibrate_int8, dequantize_int8, quantize_binary, quantize_int8, unpack_binary
from twinfold.models.tokens import Padder


@pytest.fixture(scope="module")
def stsb_sentences(data_dir):
    with open(data_dir / "stsb" / "test.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    sentences = []
    for row in rows:
        sentences += [row["sentence1"], row["sentence2"]]
    return sentences[:200]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return BiEncoder.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def st_minilm(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.mark.parametrize("batch_size", [1, 32])
def test_float32_embeddings_equal_sentence_transformers(minilm, st_minilm, stsb_sentences, batch_size):
    ours = minilm.encode(stsb_sentences, batch_size=batch_size)
    ref = st_minilm.encode(stsb_sentences, batch_size=32, convert_to_numpy=True)
    assert ours.shape == (200, 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-5


def test_settings_read_from_sentence_transformers_layout(minilm):
    assert (minilm.settings.pooling, minilm.settings.normalize, minilm.max_length) == ("mean", True, 256)


def test_export_loads_identically_in_sentence_transformers_and_twinfold(minilm, stsb_sentences, tmp_path):
    from sentence_transformers import SentenceTransformer

    minilm.settings.query_prefix = "query: "
    try:
        out = minilm.save_pretrained(tmp_path / "export", info={"eval": {"ndcg@10": 0.5}})
        before = minilm.encode(stsb_sentences[:50])
        queries = minilm.encode(stsb_sentences[:10], kind="query")
        fingerprint = minilm.fingerprint()
    finally:
        minilm.settings.query_prefix = ""
    for name in ("model.safetensors", "config.json", "tokenizer.json", "twinfold.json", "modules.json",
                 "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (out / name).exists(), name
    st = SentenceTransformer(str(out), device="cpu")
    assert np.abs(st.encode(stsb_sentences[:50]) - before).max() < 1e-5
    assert np.abs(st.encode(stsb_sentences[:10], prompt_name="query") - queries).max() < 1e-5
    reloaded = BiEncoder.from_pretrained(out)
    assert np.abs(reloaded.encode(stsb_sentences[:50]) - before).max() < 1e-6
    assert reloaded.fingerprint() == fingerprint
    assert json.loads((out / "twinfold.json").read_text())["fingerprint"] == fingerprint
    assert reloaded.info["eval"] == {"ndcg@10": 0.5}
    assert reloaded.settings.query_prefix == "query: "


def test_fingerprint_changes_with_one_weight_and_with_settings(tiny_bert_path):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    base = model.fingerprint()
    assert BiEncoder.from_pretrained(tiny_bert_path).fingerprint() == base
    with torch.no_grad():
        model.encoder.encoder.layer[0].attention.self.query.weight[0, 0] += 1e-6
    assert model.fingerprint() != base
    assert BiEncoder.from_pretrained(tiny_bert_path, max_length=32).fingerprint() != base
    assert BiEncoder.from_pretrained(tiny_bert_path, pooling="cls").fingerprint() != base


def test_padding_and_length_sorting_do_not_change_vectors(tiny_bert_path):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    texts = ["short", "a much longer text about proteins and cells", "mid length text", "x"]
    one = model.encode(texts, batch_size=1)
    many = model.encode(texts, batch_size=3)
    assert np.abs(one - many).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("pooling", sorted(POOLING_MODES))
def test_widths_rounded_up_by_the_padder_do_not_change_vectors(tiny_bert_path, pooling):
    """GPUs pad to multiples of 16 (`models.runtime.pad_multiple`): the extra padding is masked everywhere."""
    model = BiEncoder.from_pretrained(tiny_bert_path, pooling=pooling).eval()
    ids = model.token_ids(["short", "a much longer text about proteins and cells", "x"], "document")
    with torch.no_grad():
        plain = model.embed_tokens(**Padder.for_tokenizer(model.tokenizer)(ids))
        rounded = model.embed_tokens(**Padder.for_tokenizer(model.tokenizer, multiple=16)(ids))
    assert Padder.for_tokenizer(model.tokenizer, multiple=16)(ids)["input_ids"].shape[1] == 16
    torch.testing.assert_close(rounded, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_pooling_modes_match_hand_computation(tiny_bert_path, pooling):
    model = BiEncoder.from_pretrained(tiny_bert_path, pooling=pooling, normalize=False)
    features = model.tokenize(["alpha beta gamma", "delta"])
    with torch.no_grad():
        hidden = model.encoder(**features).last_hidden_state
        got = model(**features)
    n = int(features["attention_mask"][1].sum())  # second text: its real tokens only
    expected = {"mean": hidden[1, :n].mean(0), "cls": hidden[1, 0], "max": hidden[1, :n].max(0).values}[pooling]
    torch.testing.assert_close(got[1], expected, atol=1e-6, rtol=1e-5)


def test_truncation_renormalises_a_prefix():
    emb = torch.tensor([[3.0, 4.0, 12.0]]) / 13
    out = truncate(emb, 2)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8]]))
    with pytest.raises(ValueError):
        truncate(emb, 4)


def test_encode_dim_equals_truncated_full_embedding(tiny_bert_path):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    texts = ["one text", "another text here"]
    full = model.encode(texts)
    short = model.encode(texts, dim=64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)


def test_int8_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(100, 16)).astype(np.float32)
    cal = calibrate_int8(emb)
    q = quantize_int8(emb, cal)
    assert q.dtype == np.int8 and q.min() == -128 and q.max() == 127
    inside = emb < emb.max(0)  # the maximum itself lands in bucket 255, one step above its start
    assert np.all((np.abs(dequantize_int8(q, cal) - emb) <= cal.steps / 2 + 1e-6)[inside])
    # sentence-transformers' quantize_embeddings is the reference convention
    from sentence_transformers.util import quantize_embeddings

    np.testing.assert_array_equal(q, quantize_embeddings(emb, precision="int8", calibration_embeddings=emb))


def test_binary_packs_sign_bits():
    emb = np.array([[0.5, -0.1, 0.2, -0.3, 0.0, 0.1, 0.1, -0.2, 0.9]], dtype=np.float32)
    packed = quantize_binary(emb)
    assert packed.dtype == np.uint8 and packed.shape == (1, 2)
    assert packed[0, 0] == 0b10100110 and packed[0, 1] == 0b10000000
    np.testing.assert_array_equal(unpack_binary(packed, 9), np.where(emb > 0, 1.0, -1.0))
    from sentence_transformers.util import quantize_embeddings

    np.testing.assert_array_equal(packed, quantize_embeddings(emb, precision="ubinary"))


def test_encode_precisions(tiny_bert_path):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    texts = ["a", "b c", "d e f", "g h i j"]
    full = model.encode(texts)
    np.testing.assert_array_equal(model.encode(texts, precision="int8"), quantize_int8(full, calibrate_int8(full)))
    np.testing.assert_array_equal(model.encode(texts, precision="binary", dim=64),
                                  quantize_binary(model.encode(texts, dim=64)))


def test_pickle_only_checkpoint_needs_opt_in(tiny_bert_path, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert_path, folder)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        BiEncoder.from_pretrained(folder)
    model = BiEncoder.from_pretrained(folder, allow_pickle=True)
    assert model.fingerprint() == BiEncoder.from_pretrained(tiny_bert_path).fingerprint()


def test_truncated_or_missing_weights_and_missing_tokenizer(tiny_bert_path, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_bert_path, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        BiEncoder.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        BiEncoder.from_pretrained(folder)
    weights.write_bytes(data)
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        BiEncoder.from_pretrained(folder)


def test_unresolvable_name_says_what_was_tried(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub id is never looked up online
    with pytest.raises(ModelLoadError, match="tried local folder"):
        BiEncoder.from_pretrained("no-such-org/no-such-model-xyz")


def test_encode_cli_writes_embeddings_with_fingerprint(tiny_bert_path, tmp_path):
    from twinfold.models.encode import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"_id": f"d{i}", "text": f"document number {i}"}) for i in range(5)))
    for precision in ("float32", "int8", "binary"):
        out = tmp_path / f"{precision}.safetensors"
        assert main(["--model", str(tiny_bert_path), "--input", str(docs), "--output", str(out),
                     "--precision", precision, "--dim", "64", "--no-progress"]) == 0
        loaded = EmbeddingSet.load(out)
        assert loaded.ids == [f"d{i}" for i in range(5)] and loaded.dim == 64 and loaded.precision == precision
        assert loaded.fingerprint == BiEncoder.from_pretrained(tiny_bert_path).fingerprint()
    assert EmbeddingSet.load(tmp_path / "int8.safetensors").calibration is not None


def test_comparing_embeddings_of_different_models_fails(tmp_path):
    a = EmbeddingSet(np.eye(2, dtype=np.float32), ["a", "b"], "aaaa")
    b = EmbeddingSet(np.eye(2, dtype=np.float32), ["a", "b"], "bbbb")
    np.testing.assert_array_equal(similarity(a, a), np.eye(2))
    with pytest.raises(FingerprintMismatch, match="aaaa vs bbbb"):
        similarity(a, b)


def test_embedding_files_are_scored_by_the_models_similarity(tmp_path):
    vectors = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    for kind, expected in (("cosine", [[1.0, 0.8], [0.8, 1.0]]), ("dot", [[25.0, 8.0], [8.0, 4.0]])):
        EmbeddingSet(vectors, ["a", "b"], "f", similarity=kind).save(tmp_path / f"{kind}.safetensors")
        loaded = EmbeddingSet.load(tmp_path / f"{kind}.safetensors")
        assert loaded.similarity == kind
        np.testing.assert_allclose(similarity(loaded, loaded), expected, rtol=1e-6)


def test_encode_cli_reports_bad_line(tiny_bert_path, tmp_path, capsys):
    from twinfold.models.encode import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"_id": "1", "text": "fine"}\n{"_id": "2", "body": "no text"}\n')
    assert main(["--model", str(tiny_bert_path), "--input", str(docs), "--output", str(tmp_path / "o")]) == 2
    assert f"{docs}:2: field 'text'" in capsys.readouterr().err


def test_export_cli_takes_a_training_checkpoint_or_a_model_folder(tiny_bert_path, tmp_path, capsys):
    from twinfold.models.export import main

    model = BiEncoder.from_pretrained(tiny_bert_path, query_prefix="query: ")
    model.save_pretrained(tmp_path / "checkpoints" / "step-3" / "model")
    assert main([str(tmp_path / "checkpoints" / "step-3"), str(tmp_path / "out")]) == 0
    exported = BiEncoder.from_pretrained(tmp_path / "out")
    assert exported.fingerprint() == model.fingerprint() and exported.settings.query_prefix == "query: "
    assert main([str(tmp_path / "nothing-here"), str(tmp_path / "out2")]) == 2
    assert "error:" in capsys.readouterr().err


def test_token_ids_truncate_at_max_length_and_pad_as_the_tokenizer_does(tiny_bert_path):
    model = BiEncoder.from_pretrained(tiny_bert_path, max_length=6)
    # token counts with [CLS]/[SEP]: 3, 7 (truncated to 6), 4, 3, 8 (truncated to 6)
    texts = ["cell", "one two three four five", "two words", "gene", "a b c d e f"]
    assert model.text_tokenizer.lengths(texts, "document") == [3, 7, 4, 3, 8]
    assert [len(x) for x in model.token_ids(texts)] == [3, 6, 4, 3, 6]
    reference = model.tokenizer(texts, padding=True, truncation=True, max_length=6, return_tensors="pt")
    ours = model.tokenize(texts)
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    model.tokenizer.padding_side = "left"
    left = model.tokenizer(texts, padding=True, truncation=True, max_length=6, return_tensors="pt")
    assert all(torch.equal(model.tokenize(texts)[k], left[k]) for k in left)


def test_bf16_compute_is_close_to_float32_and_has_its_own_fingerprint(tiny_bert_path):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    texts = ["a protein binds the receptor", "tumour growth", "x"]
    full, bf16 = model.encode(texts), model.encode(texts, compute="bf16")
    assert 1e-5 < np.abs(full - bf16).max() < 3e-2  # really bf16 (8 bits of mantissa), and close
    assert model.fingerprint("bf16") not in (model.fingerprint(), model.fingerprint("int8"))


def test_encode_is_float32_inside_a_mixed_precision_accelerator(tiny_bert_path):
    """accelerate wraps a prepared model's forward in bf16 autocast; encode must not inherit it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = BiEncoder.from_pretrained(tiny_bert_path)
    texts = ["a protein binds the receptor", "tumour growth", "x"]
    before = model.encode(texts)
    AcceleratorState._reset_state(True)
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
        with torch.no_grad():  # training's forward is autocast: its results move by bf16 rounding
            assert np.abs(prepared(**model.tokenize(texts)).float().numpy() - before).max() > 1e-5
        assert np.abs(model.encode(texts) - before).max() < 1e-6
    finally:
        AcceleratorState._reset_state(True)


def test_int8_compute_is_close_to_float32_and_has_its_own_fingerprint(minilm, stsb_sentences):
    texts = stsb_sentences[:40]
    full = minilm.encode(texts)
    int8 = minilm.encode(texts, compute="int8")
    cosine = (full * int8).sum(1)
    assert cosine.min() > 0.95 and cosine.mean() > 0.97  # nDCG@10 cost on SciFact: see docs/performance.md
    assert np.abs(full - int8).max() > 1e-4  # really computed in int8, not the float32 path
    assert minilm.fingerprint("int8") != minilm.fingerprint()
    with pytest.raises(ValueError, match="compute must be one of"):
        minilm.encode(texts, compute="int4")


def change_weights(model: BiEncoder, how: str) -> None:
    """An in-place edit, or a step of the trainer's optimizer (fused AdamW: it leaves tensor versions as they were)."""
    if how == "in_place":
        with torch.no_grad():
            model.encoder.encoder.layer[0].intermediate.dense.weight.mul_(-1.0)
        return
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.embed(["protein folding", "gene expression"]).sum().backward()
    versions = [p._version for p in model.parameters()]
    optimizer.step()
    assert [p._version for p in model.parameters()] == versions


@pytest.mark.parametrize("how", ["in_place", "fused_adamw"])
def test_int8_copy_is_rebuilt_after_the_weights_change(tiny_bert_path, how):
    model = BiEncoder.from_pretrained(tiny_bert_path)
    texts = ["protein folding", "gene expression in cells"]
    before = model.encode(texts, compute="int8")
    assert model._compute_runner("int8") is model._compute_runner("int8")  # cached while the weights stay the same
    change_weights(model, how)
    after = model.encode(texts, compute="int8")
    assert np.abs(before - after).max() > 1e-3
    assert not any("runners" in name for name in dict(model.named_modules()))  # never saved or moved with the model


def test_encode_cli_int8_compute_records_its_fingerprint(tiny_bert_path, tmp_path):
    from twinfold.models.encode import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"_id": f"d{i}", "text": f"document number {i}"}) for i in range(3)))
    out = tmp_path / "int8-compute.safetensors"
    assert main(["--model", str(tiny_bert_path), "--input", str(docs), "--output", str(out),
                 "--compute", "int8", "--no-progress"]) == 0
    assert EmbeddingSet.load(out).fingerprint == BiEncoder.from_pretrained(tiny_bert_path).fingerprint("int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_attention_without_cudnn_gives_cudnns_vectors(tiny_bert_path, monkeypatch):
    """On a GPU the forward leaves cuDNN's attention out (`models.runtime.attention_kernels`): same vectors."""
    model = BiEncoder.from_pretrained(tiny_bert_path).to("cuda").eval()
    texts = ["short", "a much longer text about proteins and cells", "x"] * 5
    ours = model.encode(texts, batch_size=4, compute="bf16")
    monkeypatch.setenv("TWINFOLD_SDPA_CUDNN", "1")
    cudnn = model.encode(texts, batch_size=4, compute="bf16")
    assert np.abs(ours - cudnn).max() < 2e-2
