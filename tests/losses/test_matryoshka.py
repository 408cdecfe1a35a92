"""Matryoshka: weighted sum of the inner loss over re-normalised prefixes, computed from one full embedding."""
import pytest
import torch
import torch.nn.functional as F

from twinfold.losses import InfoNCE, Matryoshka, info_nce


class Spy(torch.nn.Module):
    """An inner loss that records what it was given and returns the embedding width."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, embeddings, keys=None):
        self.calls.append((embeddings, keys))
        return torch.tensor(float(embeddings["anchor"].shape[-1]))


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_weighted_sum_over_prefixes_by_hand():
    spy = Spy()
    embeddings = {"anchor": unit(4, 8), "positive": unit(4, 8, seed=1), "negative": unit(4, 2, 8, seed=2)}
    keys = {"positive": torch.arange(4)}
    loss = Matryoshka(spy, dims=[8, 4, 2], weights=[1.0, 0.5, 0.25])(embeddings, keys)
    assert loss.item() == 8 * 1.0 + 4 * 0.5 + 2 * 0.25
    for (seen, seen_keys), dim in zip(spy.calls, [8, 4, 2]):
        assert seen_keys is keys
        for role, e in seen.items():
            assert e.shape == embeddings[role].shape[:-1] + (dim,)
            torch.testing.assert_close(e, F.normalize(embeddings[role][..., :dim], dim=-1))


def test_default_weights_sum_not_mean():
    spy = Spy()
    assert Matryoshka(spy, dims=[8, 4])({"anchor": unit(2, 8), "positive": unit(2, 8)}).item() == 12.0


def test_matryoshka_infonce_equals_explicit_sum():
    anchor, positive = unit(5, 16), unit(5, 16, seed=1)
    loss = Matryoshka(InfoNCE(0.1), dims=[16, 8, 4], weights=[1.0, 2.0, 3.0])({"anchor": anchor, "positive": positive})
    expected = sum(w * info_nce(anchor[:, :d], positive[:, :d], temperature=0.1) for d, w in [(16, 1), (8, 2), (4, 3)])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_reach_the_full_embeddings():
    anchor = unit(3, 8).requires_grad_()
    Matryoshka(InfoNCE(), dims=[4])({"anchor": anchor, "positive": unit(3, 8, seed=1)}).backward()
    assert anchor.grad[:, :4].abs().sum() > 0 and anchor.grad[:, 4:].abs().sum() == 0


@pytest.mark.parametrize("dims, weights, message", [
    ([8, 4], [1.0], "one weight per dim"),
    ([8, 4], [1.0, -1.0], "must all be greater than 0"),
    ([4, 8], None, "sorted largest first"),
    ([], None, "distinct positive"),
    ([4, 4], None, "distinct positive"),
    ([0], None, "distinct positive"),
])
def test_bad_configuration(dims, weights, message):
    with pytest.raises(ValueError, match=message):
        Matryoshka(InfoNCE(), dims, weights)


def test_dim_larger_than_embedding():
    with pytest.raises(ValueError, match=r"exceed the embedding size 8"):
        Matryoshka(InfoNCE(), [16, 8])({"anchor": unit(2, 8), "positive": unit(2, 8)})


def test_raw_prefixes_for_an_inner_product_loss():
    spy = Spy()
    embeddings = {"anchor": 3 * unit(2, 8), "positive": 2 * unit(2, 8, seed=1)}
    Matryoshka(spy, dims=[8, 4], normalize=False)(embeddings)
    for (seen, _), dim in zip(spy.calls, [8, 4]):
        for role, e in seen.items():
            torch.testing.assert_close(e, embeddings[role][..., :dim])
