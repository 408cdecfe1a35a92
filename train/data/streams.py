"""Streamed training data (`data.train[i].streaming: true`): rows read as they come (a datasets IterableDataset of a
local file or a hub dataset), checked and tokenized on the fly, packed without repeated texts within blocks of
`data.shuffle_buffer` rows, from a position that checkpoints keep.

A run with a streamed dataset reads all its datasets this way (the others from their loaded and checked tables).
Each process reads its own part of every stream (`datasets.distributed.split_dataset_by_node`) and packs its
slice of each global batch from it. A stream has no known length: such runs set `train.max_steps`, and a stream
that ends starts its next pass. The dataset of each global batch follows from the seed and the batch's number
alone, so the processes agree without talking: `proportional` draws dataset d with probability weight_d / the
sum of weights, `round_robin` gives each dataset its share in turn.

A process's position (one per process in a checkpoint's `streams.json`): global batches so far, batches per
dataset, and per dataset the start of its current block (the stream's own `state_dict`, the pass, the rows read
before the block in this pass, the rows carried into it) and how many of the block's batches were used. Resuming
reads that block again, packs it in the same seeded order and skips the used batches.
"""
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset

from twinfold.losses import text_keys
from twinfold.models.tokens import Padder, TextTokenizer
from twinfold.train.config import DatasetConfig
from twinfold.train.data.batches import assemble
from twinfold.train.data.pairs import (
    KIND,
    DataError,
    PairDataset,
    dataset_name,
    load_source,
    read_error,
    role_columns,
    row_place,
    step_roles,
    text_problem,
)
from twinfold.train.data.plan import Packer

log = logging.getLogger("twinfold")
START = {"pass": 0, "source": None, "read": 0, "carry": [], "used": 0}  # a dataset's position before its first row


@dataclass
class StreamSource:
    """Where one dataset's rows come from: a file or hub dataset read as a stream (`config`), or a dataset
    loaded and checked in full (`loaded`)."""

    name: str
    weight: float
    config: DatasetConfig | None = None
    loaded: PairDataset | None = None

    @classmethod
    def streamed(cls, cfg: DatasetConfig) -> "StreamSource":
        return cls(dataset_name(cfg), cfg.weight, config=cfg)

    @classmethod
    def of(cls, ds: PairDataset) -> "StreamSource":
        return cls(ds.name, ds.weight, loaded=ds)

    def open(self, rank: int, world: int):
        """This process's part of the rows from the start, and source column -> role column."""
        from datasets.distributed import split_dataset_by_node

        if self.loaded is not None:
            rows = self.loaded.table.to_iterable_dataset()
            return split_dataset_by_node(rows, rank, world), {role: role for role in self.loaded.roles}
        rows = load_source(self.config, streaming=True)
        columns = rows.column_names or list(next(iter(rows)))
        return split_dataset_by_node(rows, rank, world), role_columns(self.config, columns)


@dataclass
class Block:
    """A block's batches and where the next block starts."""

    batches: list[dict]  # token ids and keys by role of each batch (`data.step_roles`)
    after: dict  # the position of the next block


class BlockReader:
    """One dataset's rows on this process, read a block at a time and packed into this process's batches."""

    def __init__(self, d: int, source: StreamSource, tokenizer: TextTokenizer, rank: int, world: int, rows: int,
                 buffer: int, seed: int, position: dict | None):
        self.d, self.source, self.tokenizer, self.rank, self.world = d, source, tokenizer, rank, world
        self.rows, self.buffer, self.seed = rows, buffer, seed
        self.position = position or dict(START)
        self._stream = self._iterator = self._block = None

    def next_batch(self) -> dict:
        """Token ids and keys by role of this process's next batch from this dataset."""
        while self._block is None or self.position["used"] == len(self._block.batches):
            if self._block is not None:
                self.position = self._block.after
            self._block = self._read_block()
        batch = self._block.batches[self.position["used"]]
        self.position = {**self.position, "used": self.position["used"] + 1}
        return batch

    def _read_block(self) -> Block:
        at = self.position
        room = self.buffer - len(at["carry"])
        if room <= 0:
            raise DataError(f"dataset {self.source.name}: no batch of {self.rows} rows without a repeated text "
                            f"among data.shuffle_buffer ({self.buffer}) rows; the data is mostly duplicates")
        new = self._read(room, at)
        ended = len(new) < room
        if ended and at["read"] == 0 and not new:
            raise DataError(f"dataset {self.source.name}: the stream is empty")
        rows = at["carry"] + new
        roles = list(rows[0])
        texts = {role: [r[role] for r in rows] for role in roles}
        ids = {role: self.tokenizer.ids_and_truncated(texts[role], KIND[role.split("_")[0]]) for role in roles}
        keys = {role: text_keys(texts[role]).tolist() for role in roles}
        if at == START and self.rank == 0:
            truncated = ", ".join(f"{sum(ids[role][1])} {role}" for role in roles)
            log.info("%s: in its first %d rows, texts longer than max_length %d tokens (truncated): %s",
                     self.source.name, len(rows), self.tokenizer.max_length, truncated)
        negatives = [role for role in roles if role.startswith("negative_")]
        packer = Packer(list(zip(keys["anchor"], keys["positive"])),
                        [[keys[role][i] for role in negatives] for i in range(len(rows))], self.rows)
        batches = []
        for i in np.random.default_rng([self.seed, self.d, self.rank, at["pass"], at["read"]]).permutation(len(rows)):
            packer.offer(int(i))
            while packer.full():
                batches.append(packer.take())
        if ended and at["read"] == 0 and not batches:
            part = " (this process's part)" if self.world > 1 else ""
            raise DataError(f"dataset {self.source.name}: fewer than one batch of {self.rows} rows without a "
                            f"repeated text in the whole stream{part}")
        carry = [rows[i] for i in packer.current + packer.waiting]
        after = {"pass": at["pass"] + 1, "source": None, "read": 0, "carry": carry, "used": 0} if ended else \
            {"pass": at["pass"], "source": self._stream.state_dict(), "read": at["read"] + len(new), "carry": carry,
             "used": 0}
        if ended:
            self._iterator = None  # the next block starts the next pass
        return Block([step_roles({role: ([ids[role][0][i] for i in b], [keys[role][i] for i in b]) for role in roles})
                      for b in batches], after)

    def _read(self, count: int, at: dict) -> list[dict]:
        """Up to `count` rows by role from the block start `at`, each text checked; errors name the file line (or
        row) and field."""
        cfg, rows = self.source.config, []
        try:
            if self._iterator is None:
                self._stream, self._columns = self.source.open(self.rank, self.world)
                if at["source"] is not None:
                    self._stream.load_state_dict(at["source"])
                self._iterator = iter(self._stream)
            for example in itertools.islice(self._iterator, count):
                for source, role in self._columns.items():
                    if cfg is not None and (problem := text_problem(example[source])):
                        where = row_place(cfg, at["read"] + len(rows), self.rank, self.world, self._stream.n_shards)
                        raise DataError(f"{where} field {source!r}: text is {problem}")
                rows.append({role: example[source] for source, role in self._columns.items()})
        except DataError:
            raise
        except Exception as e:  # the stream's parser: name the file (and the bad line of a JSON lines file)
            if cfg is None or not Path(cfg.path).exists():
                raise DataError(f"dataset {self.source.name}: cannot be read: {type(e).__name__}: {e}") from e
            raise read_error(Path(cfg.path), e) from e
        return rows


class StreamSteps(IterableDataset):
    """This process's assembled slices of global batches from streams, from a position on, without end.

    Iterated inline, or in one DataLoader worker (a stream is read in order), which then reads, checks and
    tokenizes ahead of the training step. Each item carries `position`: where to start again after it.
    `tokenizers`: one per source (a dataset's query prompt is its tokenizer's query prefix).
    """

    def __init__(self, sources: list[StreamSource], tokenizers: list[TextTokenizer], padder: Padder,
                 token_budget: int, max_texts: int | None, rank: int, world: int, batch_size: int, seed: int,
                 mixing: str, buffer: int, position: dict | None = None):
        self.sources, self.tokenizers, self.padder = sources, tokenizers, padder
        self.token_budget, self.max_texts, self.rank, self.world = token_budget, max_texts, rank, world
        self.batch_size, self.seed, self.mixing, self.buffer = batch_size, seed, mixing, buffer
        self.position = position or {"batches": 0, "taken": [0] * len(sources), "datasets": [None] * len(sources)}

    def __iter__(self):
        readers = [BlockReader(d, s, tokenizer, self.rank, self.world, self.batch_size // self.world,
                               self.buffer, self.seed, at) for d, (s, tokenizer, at) in
                   enumerate(zip(self.sources, self.tokenizers, self.position["datasets"]))]
        batches, taken = self.position["batches"], list(self.position["taken"])
        weights = [s.weight for s in self.sources]
        while True:
            d = choose_dataset(self.mixing, weights, self.seed, batches, taken)
            tokens = readers[d].next_batch()
            batches, taken[d] = batches + 1, taken[d] + 1
            yield {"epoch": readers[d].position["pass"], "index": batches - 1, "dataset": d, "pairs": self.batch_size,
                   "position": {"batches": batches, "taken": list(taken), "datasets": [r.position for r in readers]},
                   **assemble(tokens, self.padder, self.token_budget, self.max_texts)}


def choose_dataset(mixing: str, weights: list[float], seed: int, batch: int, taken: list[int]) -> int:
    """The dataset of global batch number `batch`: `round_robin` the one furthest behind its share of the batches
    so far (equal weights: strict turns), `proportional` a draw seeded by (seed, batch), weighted."""
    share = np.asarray(weights, dtype=np.float64) / sum(weights)
    if mixing == "round_robin":
        return int(np.argmax(share * (batch + 1) - np.asarray(taken)))
    return int(np.random.default_rng([seed, batch]).choice(len(share), p=share))
