"""InfoNCE: hand-computed values and gradients, a float64 reference, gradcheck, masking, symmetric, temperature."""
import math

import pytest
import torch

from twinfold.losses import DEFAULT_TEMPERATURE, InfoNCE, info_nce, text_keys


def t(rows, dtype=torch.float32, grad=False):
    return torch.tensor(rows, dtype=dtype, requires_grad=grad)


def cross_entropy(row: list[float], label: int, temperature: float, dropped=()) -> float:
    """-log softmax(row / temperature)[label], over the entries not in `dropped`."""
    kept = [s for j, s in enumerate(row) if j not in dropped]
    return -row[label] / temperature + math.log(sum(math.exp(s / temperature) for s in kept))


# --- hand-computed ------------------------------------------------------------------------------------
def test_two_pairs_by_hand():
    # cos(a1,p1)=0.6, cos(a1,p2)=0.8, cos(a2,p1)=0.8, cos(a2,p2)=0.6; temperature 0.1.
    anchor, positive = t([[1.0, 0.0], [0.0, 1.0]], grad=True), t([[0.6, 0.8], [0.8, 0.6]])
    loss = info_nce(anchor, positive, temperature=0.1)
    expected = -6 + math.log(math.exp(6) + math.exp(8))  # the same for both anchors
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    # dL/da1 = 1/(B t) * sum_j (softmax_1j - [j=1]) p_j, projected off a1 by the normalisation:
    # with softmax_12 = s = e^8 / (e^6 + e^8) the y-part is 1/(2*0.1) * s * (0.6 - 0.8) = -s.
    loss.backward()
    s = math.exp(8) / (math.exp(6) + math.exp(8))
    torch.testing.assert_close(anchor.grad, t([[0.0, -s], [-s, 0.0]]), rtol=1e-6, atol=1e-7)


def test_default_temperature_and_scale_invariance():
    anchor, positive = t([[1.0, 0.0], [0.0, 1.0]]), t([[0.6, 0.8], [0.8, 0.6]])
    expected = cross_entropy([0.6, 0.8], 0, DEFAULT_TEMPERATURE)
    assert DEFAULT_TEMPERATURE == 0.05
    assert info_nce(3 * anchor, 0.5 * positive).item() == pytest.approx(expected, rel=1e-6)


ANCHORS_3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
# With unit anchors e_i, cos(a_i, p_j) = p_j[i]: the similarity matrix below, not symmetric.
POSITIVES_3 = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]]
S = [[0.6, 0.0, 0.8], [0.8, 0.6, 0.0], [0.0, 0.8, 0.6]]


def test_dot_similarity_uses_the_embeddings_as_given():
    # inner products [[2, 0], [0, 3]] (cosine would be the identity); temperature 1
    anchor, positive = t([[2.0, 0.0], [0.0, 1.0]]), t([[1.0, 0.0], [0.0, 3.0]])
    expected = 0.5 * (cross_entropy([2.0, 0.0], 0, 1.0) + cross_entropy([0.0, 3.0], 1, 1.0))
    assert info_nce(anchor, positive, temperature=1.0, similarity="dot").item() == pytest.approx(expected, rel=1e-6)
    cosine = 0.5 * 2 * cross_entropy([1.0, 0.0], 0, 1.0)
    assert info_nce(anchor, positive, temperature=1.0).item() == pytest.approx(cosine, rel=1e-6)
    module = InfoNCE(1.0, similarity="dot")
    assert module({"anchor": anchor, "positive": positive}).item() == pytest.approx(expected, rel=1e-6)


def test_hard_negatives_by_hand():
    # One hard negative per anchor: n_i = e_i rotated, cos(a_i, n_j) = N[i][j]; every anchor sees all six.
    negative = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    N = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    tau = 0.5
    expected = sum(cross_entropy(S[i] + N[i], i, tau) for i in range(3)) / 3
    flat = info_nce(t(ANCHORS_3), t(POSITIVES_3), t(negative), temperature=tau)
    per_anchor = info_nce(t(ANCHORS_3), t(POSITIVES_3), t(negative).unsqueeze(1), temperature=tau)
    assert flat.item() == pytest.approx(expected, rel=1e-6)
    assert per_anchor.item() == pytest.approx(expected, rel=1e-6)


def test_symmetric_by_hand():
    tau = 0.2
    forward = sum(cross_entropy(S[i], i, tau) for i in range(3)) / 3
    backward = sum(cross_entropy([S[i][j] for i in range(3)], j, tau) for j in range(3)) / 3
    loss = info_nce(t(ANCHORS_3), t(POSITIVES_3), temperature=tau, symmetric=True)
    assert loss.item() == pytest.approx(0.5 * (forward + backward), rel=1e-6)


def test_false_negative_masking_by_hand():
    # Positives 1 and 3 are the same text: each is dropped from the other's anchor's denominator.
    tau = 0.2
    keys = torch.tensor([10, 20, 10])
    expected = (cross_entropy(S[0], 0, tau, dropped={2}) + cross_entropy(S[1], 1, tau)
                + cross_entropy(S[2], 2, tau, dropped={0})) / 3
    loss = info_nce(t(ANCHORS_3), t(POSITIVES_3), temperature=tau, positive_keys=keys)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_masking_covers_hard_negatives_and_symmetric_term():
    # Anchor 2's hard negative is the text of positives 1 and 3: dropped for anchors 1 and 3, kept for anchor 2.
    tau = 0.2
    negative = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    N = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    keys = {"positive": torch.tensor([10, 20, 10]), "negative": torch.tensor([30, 10, 40])}
    forward = (cross_entropy(S[0] + N[0], 0, tau, dropped={2, 4}) + cross_entropy(S[1] + N[1], 1, tau)
               + cross_entropy(S[2] + N[2], 2, tau, dropped={0, 4})) / 3
    column = [[S[i][j] for i in range(3)] for j in range(3)]  # positive j against all anchors
    backward = (cross_entropy(column[0], 0, tau, dropped={2}) + cross_entropy(column[1], 1, tau)
                + cross_entropy(column[2], 2, tau, dropped={0})) / 3
    loss = info_nce(t(ANCHORS_3), t(POSITIVES_3), t(negative), temperature=tau, symmetric=True,
                    positive_keys=keys["positive"], negative_keys=keys["negative"])
    assert loss.item() == pytest.approx(0.5 * (forward + backward), rel=1e-6)


def test_negatives_without_keys_are_never_masked():
    tau = 0.2
    negative = [[0.0, 1.0, 0.0]] * 3  # three copies of e2 (cos 1 with anchor 2 only), without keys
    loss = info_nce(t(ANCHORS_3), t(POSITIVES_3), t(negative), temperature=tau,
                    positive_keys=torch.tensor([1, 2, 3]))
    expected = sum(cross_entropy(S[i] + [float(i == 1)] * 3, i, tau) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# --- float64 reference --------------------------------------------------------------------------------
def reference_info_nce(anchor, positive, negative, tau, symmetric, positive_keys, negative_keys):
    """Straightforward loops in float64: one anchor (and one positive) at a time."""
    a = [x / x.norm() for x in anchor.double()]
    p = [x / x.norm() for x in positive.double()]
    n = [x / x.norm() for x in negative.double().reshape(-1, anchor.shape[1])]
    nk = negative_keys.reshape(-1).tolist()
    pk = positive_keys.tolist()
    terms = []
    for i in range(len(a)):
        candidates = [(p[j], pk[j]) for j in range(len(p))] + [(n[m], nk[m]) for m in range(len(n))]
        denominator = sum(torch.exp(a[i] @ c / tau) for idx, (c, key) in enumerate(candidates)
                          if idx == i or key != pk[i])
        terms.append(-(a[i] @ p[i]) / tau + torch.log(denominator))
    loss = sum(terms) / len(a)
    if not symmetric:
        return loss
    back = []
    for j in range(len(p)):
        denominator = sum(torch.exp(p[j] @ a[i] / tau) for i in range(len(a)) if i == j or pk[i] != pk[j])
        back.append(-(p[j] @ a[j]) / tau + torch.log(denominator))
    return 0.5 * (loss + sum(back) / len(p))


@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_float64_reference(symmetric):
    g = torch.Generator().manual_seed(0)
    anchor, positive = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    negative = torch.randn(6, 2, 8, generator=g)
    positive_keys = torch.tensor([1, 2, 3, 1, 5, 6])
    negative_keys = torch.tensor([[7, 2], [8, 9], [10, 11], [12, 13], [3, 14], [15, 16]])
    inputs32 = [x.clone().requires_grad_() for x in (anchor, positive, negative)]
    inputs64 = [x.double().requires_grad_() for x in (anchor, positive, negative)]
    loss32 = info_nce(*inputs32, temperature=0.07, symmetric=symmetric, positive_keys=positive_keys,
                      negative_keys=negative_keys)
    loss64 = reference_info_nce(*inputs64, 0.07, symmetric, positive_keys, negative_keys)
    loss32.backward()
    loss64.backward()
    assert loss32.item() == pytest.approx(loss64.item(), rel=1e-6)
    for x32, x64 in zip(inputs32, inputs64):
        torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    anchor, positive = (torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    negative = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def f(a, p, n, tau):
        return info_nce(a, p, n, temperature=tau, symmetric=True, positive_keys=torch.tensor([1, 2, 1]),
                        negative_keys=torch.tensor([[3, 2], [4, 5], [6, 7]]))

    assert torch.autograd.gradcheck(f, (anchor, positive, negative, tau))


# --- the module ---------------------------------------------------------------------------------------
def test_module_reads_roles_and_keys():
    loss_fn = InfoNCE(0.2, symmetric=True)
    embeddings = {"anchor": t(ANCHORS_3), "positive": t(POSITIVES_3)}
    keys = {"positive": torch.tensor([10, 20, 10])}
    expected = info_nce(t(ANCHORS_3), t(POSITIVES_3), temperature=0.2, symmetric=True, positive_keys=keys["positive"])
    assert loss_fn(embeddings, keys).item() == pytest.approx(expected.item(), rel=1e-6)
    assert list(loss_fn.parameters()) == []  # a fixed temperature is a buffer


def test_learnable_temperature_is_clamped_and_keeps_its_gradient():
    loss_fn = InfoNCE(0.05, learnable=True, min_temperature=0.01)
    assert [name for name, _ in loss_fn.named_parameters()] == ["log_temperature"]
    assert loss_fn.temperature.item() == pytest.approx(0.05)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(0.001))  # an optimizer step overshot the bound
    embeddings = {"anchor": t(ANCHORS_3), "positive": t(POSITIVES_3)}
    loss = loss_fn(embeddings)
    assert loss.item() == pytest.approx(sum(cross_entropy(S[i], i, 0.01) for i in range(3)) / 3, rel=1e-5)
    assert loss_fn.temperature.item() == pytest.approx(0.01)
    loss.backward()
    assert loss_fn.log_temperature.grad.abs().item() > 0


def test_text_keys_are_stable_int64():
    keys = text_keys(["a cat", "a dog", "a cat"])
    assert keys.dtype == torch.int64
    assert keys[0] == keys[2] != keys[1]
    assert keys[0].item() == text_keys(["a cat"]).item() == -6711169336525982361  # fixed across runs


@pytest.mark.parametrize("call, message", [
    (lambda: info_nce(torch.ones(3, 4), torch.ones(2, 4)), "anchor and positive"),
    (lambda: info_nce(torch.ones(3, 4), torch.ones(3, 4), torch.ones(3, 5)), "negative must be"),
    (lambda: info_nce(torch.ones(3, 4), torch.ones(3, 4), positive_keys=torch.ones(2)), "one key per positive"),
    (lambda: info_nce(torch.ones(3, 4), torch.ones(3, 4), torch.ones(3, 4), negative_keys=torch.ones(3)),
     "negative_keys need"),
    (lambda: InfoNCE()({"anchor": torch.ones(3, 4), "document": torch.ones(3, 4)}), "needs roles"),
    (lambda: InfoNCE(0.001), "min_temperature"),
])
def test_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
