"""Batch plan: global batches without duplicate texts, the same on every process, one dataset per batch; and the
sampler that hands its batches to the loader from a position on."""
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from twinfold.train.data.pairs import DataError


@dataclass(frozen=True)
class Batch:
    """One global batch: rows of one dataset."""

    dataset: int
    rows: list[int]

    def shard(self, rank: int, world_size: int) -> list[int]:
        """This process's contiguous slice; the slices in rank order are the global batch."""
        size = len(self.rows) // world_size
        return self.rows[rank * size:(rank + 1) * size]


@dataclass
class RowKeys:
    """Text keys (`losses.text_keys`) of a dataset's rows: what the plan needs to avoid duplicates."""

    name: str
    anchor: np.ndarray  # [N] int64
    positive: np.ndarray  # [N]
    negative: np.ndarray  # [N, k]
    weight: float = 1.0

    @classmethod
    def of(cls, ds) -> "RowKeys":
        """From a `train.data.TokenizedPairs`."""
        return cls(ds.name, ds.keys("anchor"), ds.keys("positive"), ds.keys("negative"), ds.weight)

    def __len__(self) -> int:
        return len(self.anchor)


class BatchPlan:
    """Deterministic batches per epoch from (seed, epoch), so every process and every resume agree.

    Each dataset is shuffled and packed into batches without repeated texts (`Packer`). A dataset
    contributes round(`weight` x its rows) rows per epoch (weight 1: every row at least once). Every batch holds
    exactly `batch_size` rows: the epoch's last batches are filled up with rows from the start of the epoch's
    order, so they are never small (a one-pair batch has no in-batch negative) and the plan does not depend on how
    many processes share a batch. `proportional` mixing shuffles the batches of all datasets together,
    `round_robin` alternates between datasets.
    """

    def __init__(self, datasets: list[RowKeys], batch_size: int, seed: int, mixing: str = "proportional"):
        self.datasets, self.batch_size, self.seed, self.mixing = datasets, batch_size, seed, mixing
        for ds in datasets:
            if len(ds) < batch_size:
                raise DataError(f"dataset {ds.name}: {len(ds)} rows, fewer than one batch of {batch_size} "
                                "(train.batch_size); lower the batch size or add data")
        self._core = [list(zip(ds.anchor.tolist(), ds.positive.tolist())) for ds in datasets]
        self._negative = [ds.negative.tolist() for ds in datasets]
        self._cache: tuple[int, list[Batch]] | None = None

    def epoch(self, epoch: int) -> list[Batch]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._plan(epoch))
        return self._cache[1]

    def batches_in(self, epochs: int) -> int:
        """Batches in the first `epochs` epochs (epochs can differ by a batch where texts repeat)."""
        return sum(len(self.epoch(e)) for e in range(epochs))

    def _plan(self, epoch: int) -> list[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        per_dataset = []
        for d, ds in enumerate(self.datasets):
            rows = max(self.batch_size, round(ds.weight * len(ds)))
            order = np.concatenate([rng.permutation(len(ds)) for _ in range(math.ceil(rows / len(ds)))])[:rows]
            per_dataset.append([Batch(d, r) for r in self._pack(d, order.tolist(), ds.name)])
        if self.mixing == "round_robin":
            mixed = [b for group in _interleave(per_dataset) for b in group]
        else:
            mixed = [b for batches in per_dataset for b in batches]
            mixed = [mixed[i] for i in rng.permutation(len(mixed))]
        return mixed

    def _pack(self, d: int, order: list[int], name: str) -> list[list[int]]:
        packer = Packer(self._core[d], self._negative[d], self.batch_size)
        batches = []
        for i in order:
            packer.offer(i)
            while packer.full():
                batches.append(packer.take())
        if not batches:
            raise DataError(f"dataset {name}: no batch of {self.batch_size} rows without a repeated text; "
                            "the data is mostly duplicates")
        while packer.current:  # the epoch's last rows, filled up from the start of the epoch
            for j in order:
                if packer.full():
                    break
                packer.add(j)  # refused if it repeats a text of the batch (the batch's own rows included)
            if packer.full():
                batches.append(packer.take())
            else:  # too few rows fit beside these: they sit out this epoch (the same for any process count)
                packer.take()
        return batches


class Packer:
    """Fills batches of `size` rows, in the order offered, in which no anchor or positive text appears twice and no
    hard negative equals an anchor or positive (a negative shared by several rows is allowed: it is a true
    negative for each). A row that would break this waits, and is offered again when the next batch starts."""

    def __init__(self, core: list[tuple[int, int]], negative: list[list[int]], size: int):
        self.core, self.negative, self.size = core, negative, size  # text keys per row: (anchor, positive), negatives
        self.current: list[int] = []
        self.waiting: list[int] = []
        self._seen_core: set[int] = set()
        self._seen_negative: set[int] = set()

    def add(self, i: int) -> bool:
        """Put row i in the current batch if it repeats no text there."""
        a, p = self.core[i]
        if a in self._seen_core or p in self._seen_core or a in self._seen_negative or p in self._seen_negative \
                or self._seen_core.intersection(self.negative[i]):
            return False
        self.current.append(i)
        self._seen_core.update(self.core[i])
        self._seen_negative.update(self.negative[i])
        return True

    def offer(self, i: int) -> None:
        """Add row i, or keep it waiting."""
        if not self.add(i):
            self.waiting.append(i)

    def full(self) -> bool:
        return len(self.current) == self.size

    def take(self) -> list[int]:
        """The current batch; the next one starts with the waiting rows that fit."""
        batch, waiting = self.current, self.waiting
        self.current, self.waiting = [], []
        self._seen_core.clear()
        self._seen_negative.clear()
        for j in waiting:
            if not (len(self.current) < self.size and self.add(j)):
                self.waiting.append(j)
        return batch


def _interleave(groups: list[list[Batch]]) -> list[list[Batch]]:
    longest = max(len(g) for g in groups)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]


class PlanSampler(Sampler):
    """The plan's batches in order from (epoch, index), across epochs without end; the loop decides when to stop."""

    def __init__(self, plan: BatchPlan, epoch: int, index: int):
        self.plan, self.epoch, self.index = plan, epoch, index

    def __iter__(self) -> Iterator[tuple[int, int, Batch]]:
        epoch, index = self.epoch, self.index
        while True:
            batches = self.plan.epoch(epoch)
            for i in range(index, len(batches)):
                yield epoch, i, batches[i]
            epoch, index = epoch + 1, 0
