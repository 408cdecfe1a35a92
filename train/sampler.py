"""Batch plan: global batches with no text twice, the same on every process, one dataset per batch."""
import math
from dataclasses import dataclass

import numpy as np

from losses import text_keys
from train.data import DataError, PairDataset


@dataclass(frozen=True)
class Batch:
    """One global batch: rows of one dataset."""

    dataset: int
    rows: list[int]

    def shard(self, rank: int, world_size: int) -> list[int]:
        """This process's contiguous slice; the slices in rank order are the global batch."""
        size = len(self.rows) // world_size
        return self.rows[rank * size:(rank + 1) * size]


class BatchPlan:
    """Deterministic batches per epoch from (seed, epoch), so every process and every resume agree.

    Each dataset is shuffled and packed greedily into batches in which no text appears twice (a row that
    would repeat a text waits for a later batch; rows left at the end of an epoch are dropped). A dataset
    contributes `weight` x its number of full batches per epoch; `proportional` mixing shuffles the batches
    of all datasets together, `round_robin` alternates between datasets.
    """

    def __init__(self, datasets: list[PairDataset], batch_size: int, seed: int, mixing: str = "proportional"):
        self.datasets, self.batch_size, self.seed, self.mixing = datasets, batch_size, seed, mixing
        self._keys = [[text_keys(ds.texts(i)).tolist() for i in range(len(ds))] for ds in datasets]
        for ds in datasets:
            if len(ds) < batch_size:
                raise DataError(f"dataset {ds.name}: {len(ds)} rows, fewer than one batch of {batch_size} "
                                "(train.batch_size); lower the batch size or add data")
        self._cache: tuple[int, list[Batch]] | None = None

    def epoch(self, epoch: int) -> list[Batch]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._plan(epoch))
        return self._cache[1]

    def __len__(self) -> int:
        """Batches in the first epoch (later epochs can differ by a batch where texts repeat)."""
        return len(self.epoch(0))

    def _plan(self, epoch: int) -> list[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        per_dataset = []
        for d, ds in enumerate(self.datasets):
            target = max(1, round(ds.weight * (len(ds) // self.batch_size)))
            passes = math.ceil(target * self.batch_size / len(ds)) + 1
            order = np.concatenate([rng.permutation(len(ds)) for _ in range(passes)])
            rows = self._pack(d, order, target)
            if not rows:
                raise DataError(f"dataset {ds.name}: no batch of {self.batch_size} rows without a repeated text; "
                                "the data is mostly duplicates")
            per_dataset.append([Batch(d, r) for r in rows])
        if self.mixing == "round_robin":
            mixed = [b for group in _interleave(per_dataset) for b in group]
        else:
            mixed = [b for batches in per_dataset for b in batches]
            mixed = [mixed[i] for i in rng.permutation(len(mixed))]
        return mixed

    def _pack(self, d: int, order: np.ndarray, target: int) -> list[list[int]]:
        keys, size = self._keys[d], self.batch_size
        batches: list[list[int]] = []
        waiting: list[int] = []
        current: list[int] = []
        seen: set[int] = set()

        def try_add(i: int) -> bool:
            if seen.intersection(keys[i]):
                return False
            current.append(i)
            seen.update(keys[i])
            return True

        for i in order.tolist():
            if not try_add(i):
                waiting.append(i)
            while len(current) == size:
                batches.append(current)
                if len(batches) == target:
                    return batches
                current, seen, still = [], set(), []
                for j in waiting:
                    if not (len(current) < size and try_add(j)):
                        still.append(j)
                waiting = still
        return batches


def _interleave(groups: list[list[Batch]]) -> list[list[Batch]]:
    longest = max(len(g) for g in groups)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]
