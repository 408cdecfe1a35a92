"""The unpadded path (models.unpad): packed rows by hand, then embeddings, a training step's loss and gradients equal
to the padded path's (float32, the CPU's reference kernel), then the fallback and the decision."""
import json
import logging

import numpy as np
import pytest
import torch

from tests.builders import assemble_texts
from tests.helpers import max_diff, records, run_train, weights
from tests.models.test_families import decoder_sizes, family_qwen3, save_family
from twinfold.losses import InfoNCE, uncached_backward
from twinfold.models import BiEncoder
from twinfold.models.pooling import POOLING_MODES, pool
from twinfold.models.tokens import Padder, length_chunks
from twinfold.models.unpad import VARLEN, packs, padded_reason, unpack, varlen_kernel
from twinfold.train.config import load_config

TEXTS = ["a", "a much longer text about proteins, cells and the immune response of mice", "short text",
         "mid length sentence here", "Tokens: 1, 2, 3!", "the quick brown fox jumps over the lazy dog"]


def test_pack_by_hand():
    out = Padder(pad_id=0, packed=True)([[5, 6, 7], [8], [9, 10]])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert out["token_type_ids"].tolist() == [[0] * 6]
    assert out["cu_seq_lens"].tolist() == [0, 3, 4, 6] and out["cu_seq_lens"].dtype == torch.int32
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    # RoBERTa-likes count positions from the padding index + 1; a left-padding tokenizer packs the same
    roberta = Padder(pad_id=1, left=True, token_type_ids=False, packed=True, first_position=2)([[5, 6], [7]])
    assert roberta["position_ids"].tolist() == [[2, 3, 2]] and "token_type_ids" not in roberta
    assert roberta["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_token_budget_counts_real_tokens_when_packed():
    lengths = [10, 9, 8, 8, 8, 3, 3, 3, 3, 3, 3, 3]
    assert length_chunks(lengths, 20) == [2, 2, 2, 6]  # padded: texts x the chunk's longest
    assert length_chunks(lengths, 20, packed=True) == [2, 2, 5, 3]  # 19, 16, 20, 9 real tokens
    assert length_chunks(lengths, 20, max_texts=4, packed=True) == [2, 2, 4, 4]
    assert length_chunks([50, 4], 20, packed=True) == [1, 1]  # longer than the budget: alone
    assert length_chunks([], 20, packed=True) == []
    assert Padder(0, multiple=16, packed=True).width(5) == 5  # packed: no rounding, a text costs its tokens


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_per_text_equals_padded(mode):
    """Packed states unpacked and pooled with the per-text mask = the padded states pooled (each text's own)."""
    torch.manual_seed(0)
    lengths = [3, 1, 2]
    states = [torch.randn(n, 4) for n in lengths]
    packed = torch.cat(states)[None]  # [1, 6, 4]
    mask = Padder(0, packed=True)([[1] * n for n in lengths])["attention_mask"]
    padded = torch.full((3, 3, 4), 7.0)  # padding states that pooling must leave out
    for i, s in enumerate(states):
        padded[i, :len(s)] = s
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    torch.testing.assert_close(pool(unpack(packed, cu, 3), mask, mode), pool(padded, mask, mode))
    if mode == "mean":  # by hand
        torch.testing.assert_close(pool(unpack(packed, cu, 3), mask, mode), torch.stack([s.mean(0) for s in states]))


@pytest.fixture(scope="module")
def family_paths(minilm_path, tmp_path_factory):
    return {name: save_family(name, minilm_path, tmp_path_factory.mktemp(name)) for name in ("xlmr", "qwen3",
                                                                                            "distilbert")}


def pair(path, **kwargs):
    """The model loaded padded and unpadded (the CPU's reference kernel), dropout off."""
    return (BiEncoder.from_pretrained(path, dropout=0.0, **kwargs).eval(),
            BiEncoder.from_pretrained(path, dropout=0.0, unpad=True, **kwargs).eval())


def assert_same_embeddings(padded, unpadded, batch_size=4):
    assert unpadded.padder.packed and not padded.padder.packed
    assert unpadded.encoder.config._attn_implementation == VARLEN
    np.testing.assert_allclose(unpadded.encode(TEXTS, batch_size), padded.encode(TEXTS, batch_size), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_bert_pair(tiny_bert_path):
    return pair(tiny_bert_path)


@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_tiny_bert_embeddings_equal_padded(tiny_bert_pair, pooling):
    for model in tiny_bert_pair:
        model.settings.pooling = pooling
    assert_same_embeddings(*tiny_bert_pair)


def test_minilm_embeddings_equal_padded_in_input_order(minilm_path):
    padded, unpadded = pair(minilm_path)
    assert_same_embeddings(padded, unpadded, batch_size=len(TEXTS))
    features = unpadded.padder(unpadded.token_ids(TEXTS))  # one packed row in the texts' own order
    assert features["input_ids"].shape == (1, sum(len(x) for x in unpadded.token_ids(TEXTS)))
    with torch.inference_mode():
        torch.testing.assert_close(unpadded.embed_tokens(**features), padded.embed(TEXTS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["xlmr", "qwen3"])  # positions from the padding index + 1; causal, GQA, left padding
def test_family_embeddings_equal_padded(family_paths, name):
    assert_same_embeddings(*pair(family_paths[name]))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_other_decoder_embeddings_equal_padded(name, tmp_path):
    """Llama, Mistral (no sliding window) and Qwen2 as tiny decoders with the Qwen3 family's tokenizer."""
    import transformers

    _, tok, _, _ = family_qwen3(None)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[name]
    config = getattr(transformers, f"{prefix}Config")(vocab_size=len(tok), pad_token_id=0, eos_token_id=0,
                                                      **decoder_sizes(), **({"sliding_window": None}
                                                                            if name == "mistral" else {}))
    torch.manual_seed(0)
    getattr(transformers, f"{prefix}Model")(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert_same_embeddings(*pair(tmp_path, pooling="lasttoken"))


def test_training_step_loss_and_gradients_equal_padded(tiny_bert_pair):
    anchors, positives = TEXTS, TEXTS[1:] + TEXTS[:1]
    results = []
    for model in tiny_bert_pair:
        model.settings.pooling = "mean"
        model.zero_grad(set_to_none=True)
        model.train()
        step = assemble_texts(model, {"anchor": anchors, "positive": positives}, token_budget=40)
        assert len(step["chunks"]["anchor"]) > 1  # several chunks, packed or padded

        def in_batch_order(embeddings, keys, order=step["order"]):
            return InfoNCE()({r: torch.empty_like(e).index_copy(0, order[r], e) for r, e in embeddings.items()})

        loss = uncached_backward(lambda features, role, m=model: m(**features), step["chunks"], in_batch_order)
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_padded, grads_padded), (loss_unpadded, grads_unpadded) = results
    torch.testing.assert_close(loss_unpadded, loss_padded, atol=1e-6, rtol=0)
    assert grads_unpadded.keys() == grads_padded.keys() and grads_padded
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_unpadded[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_family_without_a_packed_path_runs_padded_and_says_so_once(family_paths, caplog):
    with caplog.at_level(logging.WARNING, logger="twinfold.models.unpad"):
        model = BiEncoder.from_pretrained(family_paths["distilbert"], unpad=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "twinfold.models.unpad"]
    assert len(lines) == 1 and lines[0].startswith("model.unpad True: distilbert runs padded: ")
    assert model.unpad is False and not model.padder.packed


def test_the_decision_and_the_kernel():
    from transformers import MistralConfig, Qwen3Config

    def reason(config, attention="sdpa"):
        config._attn_implementation = attention
        return padded_reason(config)

    assert reason(Qwen3Config()) is None and reason(MistralConfig(sliding_window=None)) is None
    assert reason(MistralConfig()) == "sliding-window attention"  # its default window of 4096
    assert reason(Qwen3Config(), "eager").startswith("attn_implementation eager has no packed path")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert packs("auto", cuda) and not packs("auto", cpu)
    assert packs(True, cpu) and not packs(False, cuda)
    assert varlen_kernel(torch.zeros(1, dtype=torch.bfloat16), dropout=0.0) == "reference"  # the CPU's
    with pytest.raises(ValueError, match="unpad 'yes' is not one of auto, true, false"):  # before any work
        BiEncoder.from_pretrained("/nonexistent", unpad="yes")


def test_auto_on_the_cpu_runs_padded_through_the_same_attention(tiny_bert_path):
    plain, auto = BiEncoder.from_pretrained(tiny_bert_path), BiEncoder.from_pretrained(tiny_bert_path, unpad="auto")
    assert auto.encoder.config._attn_implementation == VARLEN and not auto.padder.packed
    np.testing.assert_array_equal(auto.encode(TEXTS), plain.encode(TEXTS))


def test_config_key(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"q": "a", "d": "b"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  train:\n    - path: {pairs}\n      columns: {{q: anchor, d: positive}}\n"
                      "model:\n  unpad: auto\n")
    assert load_config(recipe).model.unpad == "auto"
    assert load_config(recipe, ["model.unpad=true"]).model.unpad is True
    assert load_config(recipe, ["model.unpad=false"]).model.unpad is False


def test_encode_cli_unpadded_writes_the_padded_vectors(tiny_bert_path, tmp_path):
    from twinfold.models import EmbeddingSet
    from twinfold.models.encode import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    for unpad in ("false", "true"):
        out = tmp_path / f"{unpad}.safetensors"
        assert main(["--model", str(tiny_bert_path), "--input", str(corpus), "--output", str(out), "--unpad", unpad,
                     "--batch-size", "4", "--no-progress"]) == 0
    padded, unpadded = (EmbeddingSet.load(tmp_path / f"{u}.safetensors") for u in ("false", "true"))
    assert unpadded.ids == padded.ids
    np.testing.assert_allclose(unpadded.embeddings, padded.embeddings, atol=1e-5)


def test_a_run_with_model_unpad_true_trains_as_the_padded_run(tiny_bert_path, tmp_path):
    """`python -m twinfold.train` end to end (2 steps, dropout 0): the same logged losses and final weights."""
    steps = ("train.max_steps=2", "train.save_steps=100")
    padded = run_train(tmp_path, "padded", *steps, tiny=tiny_bert_path)
    unpadded = run_train(tmp_path, "unpadded", *steps, "model.unpad=true", tiny=tiny_bert_path)
    losses = [[r["loss"] for r in records(out) if "loss" in r] for out in (padded, unpadded)]
    assert len(losses[0]) == 2
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)
    assert max_diff(weights(unpadded / "final"), weights(padded / "final")) < 1e-5
