"""The code rotation: after training, an orthogonal map fitted so that the documents' sign bits rank as the float
vectors do, stored as the model's last Dense layer (`loss.quantization.rotation_steps`).

The map rotates each Matryoshka block (dims 0..d1, d1..d2, ... of `loss.matryoshka_dims`) on its own, so every
prefix keeps its float dot products and float search is unchanged; only the directions the sign bits measure
move. It is fitted on the training pairs, embedded once by the trained model: the anchors are the queries, and
every positive and hard negative of the pairs is a document of one bank that each query ranks by
`losses.sign_bit_ranking_loss` (a corpus-wide ranking, not a batch's). Each block is exp(A - A^T) of a free
square matrix A (always orthogonal), A starting at 0 (the identity), trained by Adam against the whole bank.
The blocks are fitted one after the other, as Matryoshka trains each prefix for its own use: block 0..d1 for
prefix d1's sign bits alone, then d1..d2 for prefix d2 with the first one fixed, and so on. On held-out training
queries this ranks as well as fitting every block at once, and each step computes only the new block's share of
the scores (docs/quantization.md).
"""
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from twinfold.losses import binarize, sign_bit_ranking_loss
from twinfold.models import BiEncoder
from twinfold.models.head import Dense
from twinfold.train.config import Config
from twinfold.train.data.pairs import PairDataset

log = logging.getLogger("twinfold.train")

ROTATION_LR = 1e-4  # chosen with 800 steps a block on held-out SciFact training queries (docs/quantization.md)
ROTATION_PAIRS = 4096  # training pairs the rotation sees at most (a seeded sample of larger data)


def orthogonal(skew: torch.Tensor) -> torch.Tensor:
    """exp(A - A^T) of a square matrix A: orthogonal for every A, the identity at A = 0."""
    return torch.matrix_exp(skew - skew.T)


def block_rotation(skews: list[torch.Tensor]) -> torch.Tensor:
    """The block-diagonal orthogonal matrix with one block `orthogonal(A)` per square matrix A of `skews`."""
    return torch.block_diag(*map(orthogonal, skews))


def fit_rotation(queries: torch.Tensor, documents: torch.Tensor, targets: torch.Tensor, dims: list[int],
                 temperature: float, steps: int, lr: float = ROTATION_LR) -> tuple[torch.Tensor, list[float]]:
    """The rotation R [D, D] (applied as x @ R) of the blocks that `dims` (the Matryoshka dims) cut, fitted block by
    block from the first: the block that completes prefix d gets `steps` Adam steps on `sign_bit_ranking_loss` at d
    alone, the blocks before it fixed. Returned with that loss, averaged over the blocks' ends, before the first
    step and after the last.

    The prefixes are not re-normalised: a query ranks the documents the same either way, and the loss then softens
    each query's ranking by how little of its vector the prefix holds (held-out training queries ranked better at
    every dim than with re-normalised prefixes: docs/quantization.md)."""
    ends = sorted(set(dims) | {queries.shape[1]})
    queries, documents = queries.clone(), documents.clone()  # rotated in place, block after block (and no longer
    # inference tensors, which autograd refuses)

    def ranking() -> float:
        return sign_bit_ranking_loss(queries, documents, targets, ends, temperature, normalize=False).item()

    before, skews = ranking(), []
    for start, end in zip([0, *ends], ends):
        # sign_bit_ranking_loss at `end`, its value and gradient, at a fraction of its cost: the fixed blocks' part
        # of the scores is computed once
        fixed = queries[:, :start] @ binarize(documents[:, :end])[:, :start].T
        skew = torch.zeros(end - start, end - start, dtype=queries.dtype, device=queries.device, requires_grad=True)
        optimizer = torch.optim.Adam([skew], lr=lr)
        for _ in range(steps):
            block = orthogonal(skew)
            bits = binarize(torch.cat([documents[:, :start], documents[:, start:end] @ block], 1))[:, start:]
            optimizer.zero_grad()
            F.cross_entropy((fixed + queries[:, start:end] @ block @ bits.T) / temperature, targets).backward()
            optimizer.step()
        skews.append(skew.detach())
        with torch.no_grad():
            block = orthogonal(skews[-1])
            queries[:, start:end] = queries[:, start:end] @ block
            documents[:, start:end] = documents[:, start:end] @ block
    with torch.no_grad():
        return block_rotation(skews), [before, ranking()]


def rotation_pairs(datasets: list[PairDataset], seed: int, limit: int = ROTATION_PAIRS) -> list[tuple[int, int]]:
    """Up to `limit` rows of the datasets (a seeded sample when they hold more), as (dataset index, row) pairs in
    order."""
    sizes = np.cumsum([0, *map(len, datasets)])
    chosen = np.arange(sizes[-1]) if sizes[-1] <= limit else \
        np.sort(np.random.default_rng(seed).choice(sizes[-1], limit, replace=False))
    which = np.searchsorted(sizes, chosen, side="right") - 1
    return [(int(i), int(row - sizes[i])) for i, row in zip(which, chosen)]


def add_code_rotation(model: BiEncoder, cfg: Config, datasets: list[PairDataset]) -> dict:
    """Fit the code rotation of `model` on the training pairs and append it to the model's head; return what
    twinfold.json records of the fit."""
    q, t = cfg.loss.quantization, cfg.train
    started = time.perf_counter()
    chosen = rotation_pairs(datasets, t.seed)
    bank: dict[str, int] = {}  # each document text once
    anchors, targets = [], []
    for i, ds in enumerate(datasets):
        rows = ds.select([r for d, r in chosen if d == i])
        anchors.append(rows.anchor)
        for documents in zip(*(rows.texts(role) for role in rows.roles[1:])):  # positive, then the negatives
            for text in documents:
                bank.setdefault(text, len(bank))
            targets.append(bank[documents[0]])
    encode = dict(batch_size=cfg.eval.batch_size, convert_to_tensor=True)  # fit_rotation clones them
    queries = torch.cat([model.encode(texts, kind="query", prompt=model.prompt_text(
        d.query_prompt_name, d.query_prompt), **encode) for texts, d in zip(anchors, cfg.data.train) if texts])
    documents = model.encode(list(bank), kind="document", **encode)
    dims = cfg.loss.matryoshka_dims or [model.dim]  # every prefix's sign bits, whichever dims the terms train
    rotation, (before, after) = fit_rotation(queries.float(), documents.float(),  # on their device
                                             torch.tensor(targets, device=queries.device), dims,
                                             cfg.loss.temperature, q.rotation_steps)
    layer = Dense(model.dim, model.dim, bias=False, activation_function=None)
    with torch.no_grad():
        layer.linear.weight.copy_(rotation.T.cpu())  # Linear computes x @ weight.T
    model.head.append(layer.to(device=model.encoder.device, dtype=model.encoder.dtype))
    seconds = time.perf_counter() - started
    log.info("code rotation: %d queries against %d documents' sign bits, loss %.4f -> %.4f in %d steps (%.1fs with "
             "encoding)", len(queries), len(documents), before, after, q.rotation_steps, seconds)
    return {"pairs": len(queries), "documents": len(documents), "blocks": sorted(set(dims) | {model.dim}),
            "steps": q.rotation_steps, "lr": ROTATION_LR, "seconds": round(seconds, 1),
            "loss_before": before, "loss_after": after}
