"""Quantization-aware terms: the documents' stored sign bits and int8 codes, exact forward values, the gradient
of the unrounded form, and their place beside InfoNCE and inside Matryoshka."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twinfold.losses import (
    InfoNCE,
    Matryoshka,
    Quantized,
    binarize,
    fake_int8,
    info_nce,
    int8_ranges,
    sign_bit_ranking_loss,
    sign_misalignment,
)
from twinfold.models.quantize import (
    calibrate_int8,
    dequantize_int8,
    quantize_binary,
    quantize_int8,
    unpack_binary,
)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_sign_bits_are_the_stored_bits_as_unit_vectors():
    x = unit(6, 12)
    x[0, 3] = 0.0  # not > 0: the bit is 0, as quantize_binary stores it
    stored = unpack_binary(quantize_binary(x.numpy()), 12)  # +-1 from the packed bits
    assert torch.equal(binarize(x), torch.from_numpy(stored).double() / math.sqrt(12))


def test_binary_term_by_hand():
    # anchors e1, e2; float cosines 0.6, 0.8 / 0.8, -0.6; signs (+,+) and (+,-) give cosines +-1/sqrt(2)
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    loss = Quantized(InfoNCE(temperature=1.0), binary=1.0)({"anchor": anchor, "positive": positive})
    c = 1 / math.sqrt(2)
    float_term = 0.5 * (math.log(1 + math.exp(0.8 - 0.6)) + math.log(1 + math.exp(0.8 + 0.6)))
    binary_term = 0.5 * (math.log(2) + math.log(1 + math.exp(2 * c)))
    assert loss.item() == pytest.approx(float_term + binary_term, rel=1e-6)


def test_sign_bit_ranking_loss_by_hand():
    # one query e1 against a bank of 3 documents at dims [2, 1]; the right one is document 1
    query = torch.tensor([[0.8, 0.6]])
    documents = torch.tensor([[0.6, 0.8], [0.8, -0.6], [-0.6, 0.8]])
    loss = sign_bit_ranking_loss(query, documents, torch.tensor([1]), [2, 1], temperature=0.5)
    c = 1 / math.sqrt(2)  # sign bits at dim 2: (+,+), (+,-), (-,+) / sqrt 2; the query scores 1.4c, 0.2c, -0.2c
    at_2 = -math.log(math.exp(0.4 * c) / sum(math.exp(x * c) for x in (2.8, 0.4, -0.4)))
    at_1 = -math.log(math.exp(2) / (2 * math.exp(2) + math.exp(-2)))  # prefix (1): bits +1, +1, -1
    assert loss.item() == pytest.approx((at_2 + at_1) / 2, rel=1e-6)


def test_sign_bit_ranking_gradient_is_the_unrounded_forms():
    queries, documents = unit(6, 8), unit(10, 8, seed=1).requires_grad_()
    targets = torch.tensor([0, 3, 5, 7, 9, 1])
    sign_bit_ranking_loss(queries, documents, targets, [8], temperature=0.1).backward()
    v = binarize(documents).detach().requires_grad_()
    F.cross_entropy(queries @ v.T / 0.1, targets).backward()
    assert torch.equal(documents.grad, v.grad) and documents.grad.abs().sum() > 0


def test_int8_codes_are_those_encode_stores():
    docs = unit(40, 16, seed=1)
    low, high = int8_ranges([docs[:25], docs[25:].reshape(5, 3, 16)], gather=False)  # positives and [B, k, d] negatives
    calibration = calibrate_int8(docs.float().numpy())
    np.testing.assert_allclose(low.numpy(), calibration.starts, rtol=1e-6)
    codes = dequantize_int8(quantize_int8(docs.float().numpy(), calibration), calibration)
    np.testing.assert_allclose(fake_int8(docs.float(), low.float(), high.float()).numpy(), codes, atol=1e-6)


def test_int8_dimension_without_range_reads_back_its_value():
    docs = unit(8, 4, seed=2)
    docs[:, 2] = 0.25
    low, high = int8_ranges([docs], gather=False)
    assert torch.equal(fake_int8(docs, low, high)[:, 2], torch.full((8,), 0.25, dtype=docs.dtype))


@pytest.mark.parametrize("store", ["binary", "int8"])
def test_straight_through_gradient_is_the_unrounded_forms(store):
    """d loss / d e is d f / d v at v = the stored values: the gradient of the loss without rounding, taken there."""
    anchor, positive, negative = unit(5, 8), unit(5, 8, seed=1).requires_grad_(), unit(5, 8, seed=2)
    low, high = int8_ranges([positive, negative], gather=False)

    def stored(x):
        return binarize(x) if store == "binary" else fake_int8(x, low, high)

    def f(p):
        return info_nce(anchor, p, stored(negative).detach(), temperature=0.1)

    f(stored(positive)).backward()
    v = stored(positive).detach().requires_grad_()
    f(v).backward()
    assert torch.equal(positive.grad, v.grad)
    assert positive.grad.abs().sum() > 0


def test_tanh_relaxation_gradient_matches_finite_differences():
    anchor, positive = unit(4, 6), unit(4, 6, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p: info_nce(anchor, binarize(p, "tanh"), temperature=0.1, gather=False), (positive,))


def test_tanh_approaches_the_sign_bits_for_large_entries():
    x = torch.tensor([[0.9, -0.6, 0.5, -0.7]])  # sqrt(4) * |entry| >= 1
    assert (binarize(x, "tanh") - binarize(x)).abs().max() < 1e-3


def test_total_is_float_plus_weighted_stored_terms():
    e = {"anchor": unit(6, 16), "positive": unit(6, 16, seed=1), "negative": unit(6, 2, 16, seed=2)}
    keys = {"positive": torch.tensor([1, 2, 3, 4, 5, 1]), "negative": torch.arange(10, 22)}
    inner = InfoNCE(temperature=0.05, symmetric=True)
    got = Quantized(inner, binary=0.5, int8=2.0)(e, keys)
    low, high = int8_ranges([e["positive"], e["negative"]], gather=False)
    binary = {"anchor": e["anchor"], "positive": binarize(e["positive"]), "negative": binarize(e["negative"])}
    int8 = {"anchor": e["anchor"], **{r: fake_int8(e[r], low, high) for r in ("positive", "negative")}}
    expected = inner(e, keys) + 0.5 * inner(binary, keys) + 2.0 * inner(int8, keys)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_alignment_term_by_hand_and_its_gradient():
    x = torch.tensor([[3.0, -4.0], [1.0, 1.0]], dtype=torch.float64)  # cos with its signs: 7 / (5 sqrt 2); 1
    assert sign_misalignment(x).tolist() == pytest.approx([1 - 7 / (5 * math.sqrt(2)), 0.0], abs=1e-12)
    e = {"anchor": unit(4, 6), "positive": unit(4, 6, seed=1), "negative": unit(4, 2, 6, seed=2)}
    inner = InfoNCE()
    rows = torch.cat([e["anchor"], e["positive"], e["negative"].reshape(-1, 6)])
    expected = inner(e) + 0.5 * sign_misalignment(rows).mean()
    assert Quantized(inner, alignment=0.5)(e).item() == pytest.approx(expected.item(), rel=1e-12)
    x = unit(3, 5, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: sign_misalignment(v).sum(), (x,))


class Spy(torch.nn.Module):
    """Records each call's embeddings; returns 0."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, embeddings, keys=None):
        self.calls.append(embeddings)
        return torch.tensor(0.0)


def test_inside_matryoshka_each_named_prefix_gets_its_own_sign_bits():
    spy = Spy()
    e = {"anchor": unit(3, 8), "positive": unit(3, 8, seed=1)}
    Matryoshka(Quantized(spy, binary=1.0, dims=[8, 2]), dims=[8, 4, 2])(e)
    widths = [(c["anchor"].shape[-1], "sign" if c["positive"].abs().unique().numel() == 1 else "float")
              for c in spy.calls]
    assert widths == [(8, "float"), (8, "sign"), (4, "float"), (2, "float"), (2, "sign")]
    prefix = F.normalize(e["positive"][:, :2], dim=-1)
    assert torch.equal(spy.calls[-1]["positive"], binarize(prefix))
    assert torch.equal(spy.calls[-1]["anchor"], F.normalize(e["anchor"][:, :2], dim=-1))  # queries stay float


@pytest.mark.parametrize("kwargs, message", [
    ({}, "one of them above 0"),
    ({"alignment": -1.0, "binary": 1.0}, "at least 0"),
    ({"binary": -1.0, "int8": 1.0}, "at least 0"),
    ({"binary": 1.0, "estimator": "sigmoid"}, "estimator"),
    ({"binary": 1.0, "dims": []}, "positive integers"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Quantized(InfoNCE(), **kwargs)
