"""Batch plan: global batches without duplicate texts, the same on every process, one dataset per batch."""
import math
from dataclasses import dataclass

import numpy as np

from twinfold.losses import text_keys
from twinfold.train.data import DataError


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

    @classmethod
    def of_texts(cls, name: str, anchor: list[str], positive: list[str], negatives: list[list[str]] | None = None,
                 weight: float = 1.0) -> "RowKeys":
        k = len(negatives[0]) if negatives else 0
        negative = text_keys([t for row in negatives for t in row]).numpy().reshape(len(anchor), k) if k \
            else np.zeros((len(anchor), 0), dtype=np.int64)
        return cls(name, text_keys(anchor).numpy(), text_keys(positive).numpy(), negative, weight)

    def __len__(self) -> int:
        return len(self.anchor)


class BatchPlan:
    """Deterministic batches per epoch from (seed, epoch), so every process and every resume agree.

    Each dataset is shuffled and packed greedily into batches in which no anchor or positive text appears
    twice and no hard negative equals an anchor or positive (a negative shared by several rows is allowed: it
    is a true negative for each of them). A row that would break this waits for a later batch. A dataset
    contributes round(`weight` x its rows) rows per epoch (weight 1: every row exactly once), so the last
    batches of a dataset's epoch may be smaller than `batch_size`; every batch's size is a multiple of
    `processes` (a short last batch is topped up with rows from the start of the epoch). `proportional`
    mixing shuffles the batches of all datasets together, `round_robin` alternates between datasets.
    """

    def __init__(self, datasets: list[RowKeys], batch_size: int, seed: int, mixing: str = "proportional",
                 processes: int = 1):
        self.datasets, self.batch_size, self.seed, self.mixing = datasets, batch_size, seed, mixing
        self.processes = processes
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

    def __len__(self) -> int:
        """Batches in the first epoch (later epochs can differ by a batch where texts repeat)."""
        return len(self.epoch(0))

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
        core, negative, size = self._core[d], self._negative[d], self.batch_size
        batches: list[list[int]] = []
        current: list[int] = []
        seen_core: set[int] = set()
        seen_negative: set[int] = set()

        def try_add(i: int) -> bool:
            a, p = core[i]
            if a in seen_core or p in seen_core or a in seen_negative or p in seen_negative \
                    or seen_core.intersection(negative[i]):
                return False
            current.append(i)
            seen_core.update(core[i])
            seen_negative.update(negative[i])
            return True

        def refill(waiting: list[int]) -> list[int]:
            nonlocal current
            current = []
            seen_core.clear()
            seen_negative.clear()
            return [j for j in waiting if not (len(current) < size and try_add(j))]

        waiting: list[int] = []
        for i in order:
            if not try_add(i):
                waiting.append(i)
            while len(current) == size:
                batches.append(current)
                waiting = refill(waiting)
        if not batches:
            raise DataError(f"dataset {name}: no batch of {size} rows without a repeated text; "
                            "the data is mostly duplicates")
        while current:  # the epoch's last rows: smaller batches, each a multiple of the number of processes
            short = len(current) % self.processes
            for j in order if short else ():
                if len(current) % self.processes == 0:
                    break
                if j not in current:
                    try_add(j)
            batches.append(current[:len(current) - len(current) % self.processes])
            waiting = refill(waiting)
        return [b for b in batches if b]


def _interleave(groups: list[list[Batch]]) -> list[list[Batch]]:
    longest = max(len(g) for g in groups)
    return [[g[i] for g in groups if i < len(g)] for i in range(longest)]
