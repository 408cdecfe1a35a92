"""Exact top-k search by inner product over float32, int8 and binary embeddings, in bounded memory.

The corpus is scored in chunks of `chunk_size` rows against blocks of queries, keeping a running top-k,
so no full [queries, corpus] score matrix is ever built. Every function returns `(scores, indices)`:
float32 and int64 tensors [queries, min(k, corpus)], best first.
"""
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from twinfold.models.quantize import Int8Calibration, dequantize_int8, quantize_binary, unpack_binary

DEFAULT_CHUNK_SIZE = 16384
SCORE_BUDGET = 1 << 24  # floats in one block of scores (64 MiB): bounds queries per block
RESCORE_MULTIPLIER = 4  # binary search: Hamming candidates per result, rescored with the float32 query


def exact_search(queries, corpus, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents of each query by float32 inner product (cosine for unit vectors)."""
    corpus = _float_tensor(corpus, "corpus")
    return _running_topk(_float_tensor(queries, "queries"), len(corpus), k, lambda a, b: corpus[a:b], chunk_size)


def int8_search(queries, corpus: np.ndarray, calibration: Int8Calibration, k: int,
                chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of float32 queries against int8 documents, each chunk dequantised with `calibration`."""
    _check_dtype(corpus, np.int8, "int8_search")
    return _running_topk(_float_tensor(queries, "queries"), len(corpus), k,
                         lambda a, b: torch.from_numpy(dequantize_int8(corpus[a:b], calibration)), chunk_size)


def binary_search(queries, corpus: np.ndarray, k: int, rescore_multiplier: int = RESCORE_MULTIPLIER,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of float32 queries against packed sign bits (uint8 [n, ceil(d/8)]) of d-dimensional documents.

    Candidates: the `rescore_multiplier * k` documents nearest in Hamming distance to the query's sign bits
    (for ±1 vectors, Hamming distance = (d - dot) / 2, so the ±1 dot product ranks them). Their final score
    is the float32 query times the document's ±1 vector.
    """
    _check_dtype(corpus, np.uint8, "binary_search")
    if rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
    queries = _float_tensor(queries, "queries")
    dim = queries.shape[1]
    if corpus.ndim != 2 or corpus.shape[1] != (dim + 7) // 8:
        raise ValueError(f"packed corpus of shape {tuple(corpus.shape)} does not hold {dim}-dimensional sign bits")
    signs = torch.from_numpy(unpack_binary(quantize_binary(queries.numpy()), dim))
    _, candidates = _running_topk(signs, len(corpus), rescore_multiplier * k,
                                  lambda a, b: torch.from_numpy(unpack_binary(corpus[a:b], dim)), chunk_size)
    width = candidates.shape[1]
    scores, indices = [torch.empty(0, min(k, width))], [torch.empty(0, min(k, width), dtype=torch.long)]
    step = max(1, SCORE_BUDGET // (width * dim))
    for qs in range(0, len(queries), step):
        block = candidates[qs:qs + step]
        top, where = rescore_binary(queries[qs:qs + step], corpus[block.numpy()], k)
        scores.append(top)
        indices.append(block.gather(1, where))
    return torch.cat(scores), torch.cat(indices)


def rescoring_note(rescore_multiplier: int, k: int) -> str:
    """How binary results were searched, for reports: the rescoring depth in words."""
    return (f"binary: sign bits searched by Hamming distance; the {rescore_multiplier * k} nearest documents per query "
            f"(rescore multiplier {rescore_multiplier} x top {k}) rescored with the float32 query.")


def search_parts(parts: Iterable, search: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over a corpus stored in parts (each with a length), one part at a time: `search(part)` gives the
    part's top-k (scores, rows in the part); the merged rows are numbered across the parts."""
    scores = rows = None
    start = 0
    for part in parts:
        found, where = search(part)
        where, start = where + start, start + len(part)
        if scores is not None:
            found, where = torch.cat([scores, found], 1), torch.cat([rows, where], 1)
        scores, best = found.topk(min(k, found.shape[1]), dim=1)
        rows = where.gather(1, best)
    return scores, rows


def rescore_binary(queries, codes: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each float32 query [q, d] among its candidates' packed sign bits [q, c, ceil(d/8)], scored by
    the query times the candidate's ±1 vector: (scores, positions among the candidates), best first."""
    queries = _float_tensor(queries, "queries")
    docs = torch.from_numpy(unpack_binary(codes, queries.shape[1]))
    return torch.einsum("qd,qcd->qc", queries, docs).topk(min(k, codes.shape[1]), dim=1)


def _running_topk(queries: torch.Tensor, n_docs: int, k: int, chunk: Callable[[int, int], torch.Tensor],
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `queries @ chunk(a, b).T` over corpus rows [a, b), chunk by chunk."""
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1, got k={k}, chunk_size={chunk_size}")
    if n_docs == 0:
        raise ValueError("the corpus is empty: there is nothing to search")
    k = min(k, n_docs)
    per_block = max(1, SCORE_BUDGET // min(chunk_size, n_docs))
    scores = torch.empty(len(queries), k)
    indices = torch.empty(len(queries), k, dtype=torch.long)
    for qs in range(0, len(queries), per_block):
        block = queries[qs:qs + per_block]
        best = torch.empty(len(block), 0)
        best_idx = torch.empty(len(block), 0, dtype=torch.long)
        for start in range(0, n_docs, chunk_size):
            docs = chunk(start, min(start + chunk_size, n_docs))
            if docs.shape[1] != block.shape[1]:
                raise ValueError(f"queries have {block.shape[1]} dimensions, documents {docs.shape[1]}")
            cand = torch.cat([best, block @ docs.T], dim=1)
            cand_idx = torch.cat([best_idx, torch.arange(start, start + len(docs)).expand(len(block), -1)], dim=1)
            best, where = cand.topk(min(k, cand.shape[1]), dim=1)
            best_idx = cand_idx.gather(1, where)
        scores[qs:qs + len(block)] = best
        indices[qs:qs + len(block)] = best_idx
    return scores, indices


def _float_tensor(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().float()
    if t.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array [n, dim], got shape {tuple(t.shape)}")
    return t


def _check_dtype(array: np.ndarray, dtype, where: str) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != dtype:
        got = getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"{where} needs a numpy {np.dtype(dtype).name} corpus, got {got}")
