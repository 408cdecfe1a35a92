"""Distillation from teacher scores (MarginMSE, listwise KL): hand-computed values and gradients, gradcheck, the
layouts of the negatives, composition with Matryoshka and the quantization terms, errors."""
import math

import pytest
import torch

from twinfold.losses import (
    Distillation,
    Matryoshka,
    Quantized,
    binarize,
    listwise_kl,
    margin_mse,
    student_scores,
    truncate,
)


def t(rows, dtype=torch.float32, grad=False):
    return torch.tensor(rows, dtype=dtype, requires_grad=grad)


# Row 1: cos(a1, p1) = 0.6, cos(a1, n1) = 0.8; row 2: cos(a2, p2) = 1 (p2 is 2 a2: the cosine ignores length),
# cos(a2, n2) = 0. Teacher scores: row 1 [0.9, 0.1], row 2 [0.5, 0.25].
ANCHOR, POSITIVE, NEGATIVE = [[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.0, 2.0]], [[0.8, 0.6], [1.0, 0.0]]
SCORES = [[0.9, 0.1], [0.5, 0.25]]


def kl(teacher: list[float], student: list[float]) -> float:
    """KL(softmax(teacher) || softmax(student))."""
    def log_softmax(x):
        norm = math.log(sum(math.exp(v) for v in x))
        return [v - norm for v in x]
    lt, ls = log_softmax(teacher), log_softmax(student)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def softmax(x: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in x)
    return [math.exp(v) / total for v in x]


# --- hand-computed ------------------------------------------------------------------------------------
def test_margin_mse_by_hand():
    # margins, student - teacher: row 1 (0.6 - 0.8) - (0.9 - 0.1) = -1.0; row 2 (1 - 0) - (0.5 - 0.25) = 0.75
    anchor = t(ANCHOR, grad=True)
    loss = margin_mse(anchor, t(POSITIVE), t(NEGATIVE), t(SCORES))
    assert loss.item() == pytest.approx((1.0 + 0.75 ** 2) / 2, rel=1e-6)
    # dL/da1 = 2 * (-1.0) / 2 * d(cos(a1, p1) - cos(a1, n1))/da1, and at a unit a, d cos(a, d)/da = d^ - (a . d^) a:
    # (0.6, 0.8) - 0.6 (1, 0) - [(0.8, 0.6) - 0.8 (1, 0)] = (0, 0.2). Row 2: d cos/da2 is (0, 0) for p2 (parallel)
    # and (1, 0) - 0 = (1, 0) for n2, so dL/da2 = 2 * 0.75 / 2 * (0 - (1, 0)) = (-0.75, 0).
    loss.backward()
    torch.testing.assert_close(anchor.grad, t([[0.0, -0.2], [-0.75, 0.0]]), rtol=1e-6, atol=1e-7)


def test_margin_mse_temperatures_scale_each_side():
    # student margins / 0.5, teacher margins / 2: row 1 -0.4 - 0.4, row 2 2.0 - 0.125
    loss = margin_mse(t(ANCHOR), t(POSITIVE), t(NEGATIVE), t(SCORES), temperature=0.5, teacher_temperature=2.0)
    assert loss.item() == pytest.approx((0.8 ** 2 + 1.875 ** 2) / 2, rel=1e-6)


def test_listwise_kl_by_hand():
    anchor = t(ANCHOR, grad=True)
    tau, tau_teacher = 0.5, 0.25
    loss = listwise_kl(anchor, t(POSITIVE), t(NEGATIVE), t(SCORES), temperature=tau, teacher_temperature=tau_teacher)
    student = [[0.6 / tau, 0.8 / tau], [1.0 / tau, 0.0]]
    teacher = [[s / tau_teacher for s in row] for row in SCORES]
    assert loss.item() == pytest.approx((kl(teacher[0], student[0]) + kl(teacher[1], student[1])) / 2, rel=1e-6)
    # d KL / d student logit j = softmax(student)_j - softmax(teacher)_j, / B, and a logit is cos / tau.
    # Row 1: d cos/da1 is (0, 0.8) for p1 and (0, 0.6) for n1; row 2: (0, 0) for p2 and (1, 0) for n2.
    loss.backward()
    g = [[(ps - pt) / (2 * tau) for ps, pt in zip(softmax(s), softmax(z))] for s, z in zip(student, teacher)]
    expected = [[0.0, g[0][0] * 0.8 + g[0][1] * 0.6], [g[1][1] * 1.0, 0.0]]
    torch.testing.assert_close(anchor.grad, t(expected), rtol=1e-5, atol=1e-7)


def test_listwise_kl_is_zero_where_the_student_ranks_as_the_teacher_scores():
    scores = student_scores(t(ANCHOR), t(POSITIVE), t(NEGATIVE))
    torch.testing.assert_close(scores, t([[0.6, 0.8], [1.0, 0.0]]), rtol=0, atol=1e-7)
    assert listwise_kl(t(ANCHOR), t(POSITIVE), t(NEGATIVE), 3 * scores, temperature=0.1,
                       teacher_temperature=0.3).item() == pytest.approx(0.0, abs=1e-6)


def test_dot_similarity_uses_the_embeddings_as_given():
    # inner products: row 1 0.6 and 0.8, row 2 2.0 and 0.0
    loss = margin_mse(t(ANCHOR), t(POSITIVE), t(NEGATIVE), t(SCORES), similarity="dot")
    assert loss.item() == pytest.approx((1.0 + 1.75 ** 2) / 2, rel=1e-6)


@pytest.mark.parametrize("loss", [margin_mse, listwise_kl])
def test_negative_layouts_agree_and_several_negatives_average(loss):
    g = torch.Generator().manual_seed(0)
    anchor, positive = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    negative, scores = torch.randn(3, 2, 8, generator=g), torch.randn(3, 3, generator=g)
    per_row = loss(anchor, positive, negative, scores, temperature=0.2)
    assert loss(anchor, positive, negative.reshape(6, 8), scores, temperature=0.2).item() == per_row.item()
    if loss is margin_mse:  # the mean over both negatives' squared margin errors
        one = [margin_mse(anchor, positive, negative[:, j], scores[:, [0, j + 1]], temperature=0.2) for j in (0, 1)]
        assert per_row.item() == pytest.approx(sum(one).item() / 2, rel=1e-6)


@pytest.mark.parametrize("loss", [margin_mse, listwise_kl])
def test_gradcheck(loss):
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    negative = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(3, 3, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, p, n: loss(a, p, n, scores, temperature=0.3, teacher_temperature=0.7),
                                    (*inputs, negative))


# --- composition --------------------------------------------------------------------------------------------
def embeddings(seed=2, batch=4, dim=16, k=2):
    g = torch.Generator().manual_seed(seed)
    return ({"anchor": torch.randn(batch, dim, generator=g), "positive": torch.randn(batch, dim, generator=g),
             "negative": torch.randn(batch * k, dim, generator=g)},
            {"scores": torch.randn(batch, 1 + k, generator=g), "positive": torch.arange(batch)})


@pytest.mark.parametrize("kind", ["margin_mse", "kl"])
def test_module_reads_the_scores_key_and_ignores_text_keys(kind):
    e, keys = embeddings()
    function = margin_mse if kind == "margin_mse" else listwise_kl
    expected = function(e["anchor"], e["positive"], e["negative"], keys["scores"], temperature=0.05,
                        teacher_temperature=0.1)
    assert Distillation(kind, 0.05, 0.1)(e, keys).item() == expected.item()


@pytest.mark.parametrize("kind", ["margin_mse", "kl"])
def test_inside_matryoshka_each_prefix_is_distilled_from_the_same_scores(kind):
    e, keys = embeddings()
    inner = Distillation(kind, 0.05, 0.05)
    got = Matryoshka(inner, [16, 8, 4], [1.0, 0.5, 0.25])(e, keys)
    expected = sum(w * inner({r: truncate(x, d) for r, x in e.items()}, keys) for d, w in ((16, 1.0), (8, 0.5),
                                                                                          (4, 0.25)))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_quantized_terms_distil_the_stored_documents():
    e, keys = embeddings()
    inner = Distillation("margin_mse", 0.05, 0.05)
    stored = {r: binarize(x) if r != "anchor" else x for r, x in e.items()}
    expected = inner(e, keys) + 0.5 * inner(stored, keys)
    assert Quantized(inner, binary=0.5)(e, keys).item() == pytest.approx(expected.item(), rel=1e-6)


# --- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda e, k: Distillation("margin_mse")({"anchor": e["anchor"], "positive": e["positive"]}, k),
     "needs roles 'anchor', 'positive' and 'negative'"),
    (lambda e, k: Distillation("kl")(e, {"positive": k["positive"]}), r"needs the teacher's scores"),
    (lambda e, k: margin_mse(e["anchor"], e["positive"], e["negative"], k["scores"][:, :2]),
     r"teacher scores must be \[batch, 1 \+ negatives\] = \[4, 3\]"),
    (lambda e, k: margin_mse(e["anchor"], e["positive"], None, k["scores"]), "distillation needs hard negatives"),
    (lambda e, k: margin_mse(e["anchor"], e["positive"], e["negative"][:3], k["scores"]),
     "distillation needs hard negatives"),
    (lambda e, k: Distillation("mse"), "kind must be one of"),
    (lambda e, k: Distillation("kl", teacher_temperature=0.0), "temperatures must be greater than 0"),
    (lambda e, k: margin_mse(e["anchor"], e["positive"], e["negative"], k["scores"], similarity="l2"),
     "similarity must be one of"),
])
def test_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call(*embeddings())
