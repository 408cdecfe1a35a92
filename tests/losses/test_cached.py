"""Cached (GradCache) steps give the loss and parameter gradients of the plain autograd step, on a tiny BERT."""
import json
from contextlib import contextmanager

import pytest
import torch

from twinfold.losses import (
    Distillation,
    InfoNCE,
    Matryoshka,
    Quantized,
    ReplayMismatch,
    cached_backward,
    chunked,
    text_keys,
    uncached_backward,
)
from twinfold.models import BiEncoder

KIND = {"anchor": "query", "positive": "document", "negative": "document"}
MINI = 3  # 8 rows -> chunks of 3, 3, 2


@pytest.fixture(scope="module")
def pairs(data_dir):
    with open(data_dir / "scifact-train-pairs" / "train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(16)]
    return [(r["anchor"], r["positive"][:200]) for r in rows]


@pytest.fixture(scope="module")
def batch(pairs):
    """8 pairs; positive 5 repeats positive 1 (a false negative to mask); negatives are other pairs' positives;
    teacher scores of each anchor's positive and negative (for the distillation losses; InfoNCE ignores them)."""
    anchors = [a for a, _ in pairs[:8]]
    positives = [p for _, p in pairs[:8]]
    positives[5] = positives[1]
    negatives = [p for _, p in pairs[8:16]]
    texts = {"anchor": anchors, "positive": positives, "negative": negatives}
    scores = torch.linspace(-1.0, 1.0, 16).reshape(8, 2)
    return texts, {"positive": text_keys(positives), "negative": text_keys(negatives), "scores": scores}


def load(path, dropout):
    torch.manual_seed(0)
    return BiEncoder.from_pretrained(path, dropout=dropout).train()


def embedder(model):
    return lambda texts, role: model.embed(texts, KIND[role])


def chunks(texts, size=MINI):
    return chunked(texts, size)


def whole(texts):
    return chunked(texts)


def chunked_reference(model, texts, loss_fn, keys):
    """The plain autograd step over the same chunks, in the same order, as `cached_backward`."""
    embed = embedder(model)
    embeddings = {role: torch.cat([embed(rows[s:s + MINI], role) for s in range(0, len(rows), MINI)])
                  for role, rows in texts.items()}
    loss = loss_fn(embeddings, keys)
    loss.backward()
    return loss.detach()


def gradients(*modules):
    return {f"{i}.{name}": p.grad.clone() for i, m in enumerate(modules)
            for name, p in m.named_parameters() if p.grad is not None}


def zero(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


def assert_same_gradients(got, expected, rel=1e-5):
    """Each parameter's gradient within `rel` of its largest entry (a floor of 1e-4 of the largest entry
    overall covers gradients that are zero up to rounding, e.g. attention key biases)."""
    assert got.keys() == expected.keys() and len(got) > 10
    overall = max(g.abs().max() for g in expected.values())
    for name, g in expected.items():
        assert (got[name] - g).abs().max() <= rel * max(g.abs().max(), 1e-4 * overall), name


LOSSES = {
    "infonce": (lambda: InfoNCE(), ("anchor", "positive"), False),
    "matryoshka": (lambda: Matryoshka(InfoNCE(), [128, 64, 32], [1.0, 0.5, 0.25]), ("anchor", "positive"), False),
    "negatives+symmetric+masking+learnable": (
        lambda: Matryoshka(InfoNCE(learnable=True, symmetric=True), [128, 32]),
        ("anchor", "positive", "negative"), True),
    "quantized-binary+int8": (
        lambda: Matryoshka(Quantized(InfoNCE(symmetric=True), binary=1.0, int8=0.5, alignment=0.3), [128, 32]),
        ("anchor", "positive", "negative"), True),
    "quantized-tanh": (lambda: Matryoshka(Quantized(InfoNCE(), binary=1.0, estimator="tanh"), [128, 32]),
                       ("anchor", "positive"), False),
    "margin_mse+matryoshka": (lambda: Matryoshka(Distillation("margin_mse", 0.05, 0.05), [128, 32]),
                              ("anchor", "positive", "negative"), True),
    "kl+matryoshka+quantized": (
        lambda: Matryoshka(Quantized(Distillation("kl", 0.05, 0.5), binary=1.0, int8=0.5), [128, 32]),
        ("anchor", "positive", "negative"), True),
}


@pytest.mark.parametrize("name", LOSSES)
def test_cached_equals_plain_step_over_the_same_chunks_with_dropout(tiny_bert_path, batch, name):
    make_loss, roles, with_keys = LOSSES[name]
    texts = {role: batch[0][role] for role in roles}
    keys = batch[1] if with_keys else None
    model, loss_fn = load(tiny_bert_path, 0.1), make_loss()

    torch.manual_seed(1)
    expected_loss = chunked_reference(model, texts, loss_fn, keys)
    expected, rng_after = gradients(model, loss_fn), torch.get_rng_state()
    zero(model, loss_fn)
    torch.manual_seed(1)
    loss = cached_backward(embedder(model), chunks(texts), loss_fn, keys=keys)

    assert not loss.requires_grad
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert_same_gradients(gradients(model, loss_fn), expected)
    assert torch.equal(torch.get_rng_state(), rng_after)  # later random draws are unaffected


def test_dropout_matters_so_the_chunked_reference_is_needed(tiny_bert_path, batch):
    model, texts = load(tiny_bert_path, 0.1), {role: batch[0][role] for role in ("anchor", "positive")}
    torch.manual_seed(1)
    by_chunk = chunked_reference(model, texts, InfoNCE(), None)
    torch.manual_seed(1)
    one = uncached_backward(embedder(model), whole(texts), InfoNCE())
    assert abs(by_chunk.item() - one.item()) > 1e-4


@pytest.mark.parametrize("name", ["infonce", "matryoshka"])
def test_cached_equals_whole_batch_step_without_dropout(tiny_bert_path, batch, name):
    # Chunks pad to their own longest text, so float32 rounding differs from the whole batch by ~1e-7 per
    # embedding; the plain chunked step shows the same difference, hence 1e-4 here rather than 1e-5.
    make_loss, roles, _ = LOSSES[name]
    texts = {role: batch[0][role] for role in roles}
    model, loss_fn = load(tiny_bert_path, 0.0), make_loss()
    expected_loss = uncached_backward(embedder(model), whole(texts), loss_fn)
    expected = gradients(model)
    zero(model)
    loss = cached_backward(embedder(model), chunks(texts), loss_fn)
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert_same_gradients(gradients(model), expected, rel=1e-4)


def test_scale_and_accumulation(tiny_bert_path, batch):
    texts = {role: batch[0][role] for role in ("anchor", "positive")}
    model = load(tiny_bert_path, 0.0)
    full = cached_backward(embedder(model), chunks(texts), InfoNCE())
    expected = gradients(model)
    zero(model)
    for _ in range(2):  # two accumulation steps of half weight each; the returned loss is unscaled
        assert cached_backward(embedder(model), chunks(texts), InfoNCE(), scale=0.5).item() == full.item()
    assert_same_gradients(gradients(model), expected)


def test_no_sync_wraps_every_chunk_but_the_last(tiny_bert_path, batch):
    texts = {role: batch[0][role] for role in ("anchor", "positive")}
    model = load(tiny_bert_path, 0.0)
    inside, seen = [False], []

    @contextmanager
    def no_sync():
        inside[0] = True
        yield
        inside[0] = False

    def embed(rows, role):
        if torch.is_grad_enabled():
            seen.append(inside[0])
        return model.embed(rows, KIND[role])

    cached_backward(embed, chunks(texts), InfoNCE(), no_sync=no_sync)
    assert seen == [True] * 5 + [False]  # 2 roles x 3 chunks


def test_custom_backward_is_used_once_on_the_loss(tiny_bert_path, batch):
    texts = {role: batch[0][role] for role in ("anchor", "positive")}
    model, calls = load(tiny_bert_path, 0.0), []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()

    loss = cached_backward(embedder(model), chunks(texts), InfoNCE(), scale=0.25, backward=backward)
    assert len(calls) == 1 and calls[0].item() == pytest.approx(0.25 * loss.item())


def test_errors(tiny_bert_path, batch):
    model, texts = load(tiny_bert_path, 0.0), batch[0]
    with pytest.raises(ValueError, match="chunk size"):
        chunked(texts, 0)
    assert chunked({"anchor": [1, 2, 3]}, 2) == {"anchor": [[1, 2], [3]]}
    assert chunked({"anchor": [1]}) == {"anchor": [[1]]}
    with pytest.raises(ValueError, match=r"does not use role\(s\) \['negative'\]"):
        cached_backward(embedder(model), chunks(texts, 4),
                        lambda e, k: InfoNCE()({r: e[r] for r in ("anchor", "positive")}))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_replayed_chunks_reproduce_the_cached_ones_on_this_device(tiny_bert_path, batch, device, precision):
    """Run with dropout on each device there is (a GPU too, where the no-grad and grad passes may pick other
    attention kernels): the replay check passes and the gradients are those of the plain chunked step."""
    texts = {role: batch[0][role] for role in ("anchor", "positive", "negative")}
    model, loss_fn = load(tiny_bert_path, 0.1).to(device), InfoNCE(symmetric=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    torch.manual_seed(1)
    with autocast:
        expected_loss = chunked_reference(model, texts, loss_fn, None)
    expected = gradients(model)
    zero(model)
    torch.manual_seed(1)
    with autocast:
        loss = cached_backward(embedder(model), chunks(texts), loss_fn, check_replay=True)
    rel = {("cpu", "float32"): 1e-5, ("cuda", "float32"): 1e-4}.get((device, precision), 5e-2)  # bf16: rounding
    assert loss.item() == pytest.approx(expected_loss.item(), rel=rel)
    assert_same_gradients(gradients(model), expected, rel=rel)


def test_a_replay_that_draws_other_dropout_fails_loudly(tiny_bert_path, batch):
    texts = {role: batch[0][role] for role in ("anchor", "positive")}
    model = load(tiny_bert_path, 0.1)

    def embed(rows, role):  # a grad pass that draws one extra random number: other dropout masks
        if torch.is_grad_enabled() and role == "positive":
            torch.rand(1)
        return model.embed(rows, KIND[role])

    with pytest.raises(ReplayMismatch, match=r"re-embedding positive rows \d+\.\.\d+ gave embeddings that differ"):
        cached_backward(embed, chunks(texts), InfoNCE())
    zero(model)
    cached_backward(embed, chunks(texts), InfoNCE(), check_replay=False)  # unchecked, the wrong step goes through
