"""Exact search in bounded memory: float32, int8 and binary (Hamming candidates rescored), against brute force."""
import numpy as np
import pytest
import torch

from twinfold.models import search
from twinfold.models.quantize import calibrate_int8, dequantize_int8, quantize_binary, quantize_int8, unpack_binary
from twinfold.models.search import binary_search, exact_search, int8_search


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_topk(scores: np.ndarray, k: int):
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_hand_made_top_k():
    corpus = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.5, 0.0], [1.0, 0.0, 0.0, 0.2]], dtype=np.float32)
    scores, indices = exact_search(queries, corpus, k=2, chunk_size=3)
    assert indices.tolist() == [[1, 2], [0, 3]]
    np.testing.assert_allclose(scores.numpy(), [[0.9, 0.5], [1.0, 0.2]], rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_exact_search_equals_brute_force_across_chunks_and_query_blocks(chunk_size, monkeypatch):
    monkeypatch.setattr(search, "SCORE_BUDGET", 50)  # forces several query blocks too
    rng = np.random.default_rng(0)
    queries, corpus = _unit(rng, 23, 16), _unit(rng, 101, 16)
    scores, indices = exact_search(queries, corpus, k=10, chunk_size=chunk_size)
    want_scores, want_indices = _brute_topk(queries @ corpus.T, 10)
    assert indices.numpy().tolist() == want_indices.tolist()
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-6)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64


def test_k_larger_than_corpus_returns_the_whole_corpus_ranked():
    rng = np.random.default_rng(1)
    scores, indices = exact_search(torch.from_numpy(_unit(rng, 3, 8)), _unit(rng, 5, 8), k=100, chunk_size=2)
    assert indices.shape == (3, 5) and sorted(indices[0].tolist()) == list(range(5))
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_int8_search_scores_float_queries_against_dequantised_documents():
    rng = np.random.default_rng(2)
    queries, corpus = _unit(rng, 9, 32), _unit(rng, 70, 32)
    calibration = calibrate_int8(corpus)
    stored = quantize_int8(corpus, calibration)
    scores, indices = int8_search(queries, stored, calibration, k=5, chunk_size=16)
    want_scores, want_indices = _brute_topk(queries @ dequantize_int8(stored, calibration).T, 5)
    assert indices.numpy().tolist() == want_indices.tolist()
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)
    # and it finds nearly what float32 finds
    _, float_indices = _brute_topk(queries @ corpus.T, 1)
    assert (indices[:, 0].numpy() == float_indices[:, 0]).mean() >= 0.8


def _hamming(queries: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """Brute-force Hamming distances by popcount of XOR (the definition the search must honour)."""
    q = quantize_binary(queries)
    return np.unpackbits(q[:, None, :] ^ packed[None, :, :], axis=-1).sum(-1)


@pytest.mark.parametrize("dim", [16, 21])  # 21: the last byte is padded
def test_binary_candidates_are_the_hamming_nearest_and_rescored_with_float_queries(dim):
    rng = np.random.default_rng(3)
    queries, corpus = _unit(rng, 11, dim), _unit(rng, 90, dim)
    packed = quantize_binary(corpus)
    k, multiplier = 3, 4
    scores, indices = binary_search(queries, packed, k=k, rescore_multiplier=multiplier, chunk_size=13)
    distances = _hamming(queries, packed)
    signs = unpack_binary(packed, dim)
    for q in range(len(queries)):
        # every returned document is within the rescore_multiplier * k smallest Hamming distances
        threshold = np.sort(distances[q])[multiplier * k - 1]
        assert (distances[q][indices[q].numpy()] <= threshold).all()
        np.testing.assert_allclose(scores[q].numpy(), signs[indices[q].numpy()] @ queries[q], atol=1e-5)
        assert (scores[q, :-1] >= scores[q, 1:]).all()


def test_binary_search_with_every_document_rescored_is_exact_on_sign_vectors():
    rng = np.random.default_rng(4)
    queries, corpus = _unit(rng, 5, 24), _unit(rng, 40, 24)
    packed = quantize_binary(corpus)
    scores, indices = binary_search(queries, packed, k=4, rescore_multiplier=10, chunk_size=9)
    want_scores, want_indices = _brute_topk(queries @ unpack_binary(packed, 24).T, 4)
    np.testing.assert_allclose(scores.numpy(), want_scores, atol=1e-5)
    assert indices.numpy().tolist() == want_indices.tolist()


def test_clear_errors():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="dimensions"):
        exact_search(_unit(rng, 2, 8), _unit(rng, 3, 4), k=1)
    with pytest.raises(ValueError, match="empty"):
        exact_search(_unit(rng, 2, 8), np.zeros((0, 8), np.float32), k=1)
    with pytest.raises(ValueError, match="int8"):
        int8_search(_unit(rng, 2, 8), _unit(rng, 3, 8), calibrate_int8(_unit(rng, 3, 8)), k=1)
    with pytest.raises(ValueError, match="sign bits"):
        binary_search(_unit(rng, 2, 16), quantize_binary(_unit(rng, 3, 8)), k=1)
    with pytest.raises(ValueError, match="k and chunk_size"):
        exact_search(_unit(rng, 2, 8), _unit(rng, 3, 8), k=0)
