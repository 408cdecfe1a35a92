"""What a training step consumes: this process's slice of a global batch, per role sorted by token length and cut
into chunks by a token budget (padded, or packed without padding), ready before the device needs it.

One mechanism for every device: the device only decides the sizes (`models.runtime.default_token_budget`,
`loader_settings`). A `torch.utils.data.DataLoader` runs `StepBatches` in worker processes on GPUs (pinned memory,
prefetch), inline on CPUs. The loss gets the embeddings back in batch order (`order`), so the in-batch
negatives are exactly the sampled ones.
"""

import torch
from torch.utils.data import DataLoader, Dataset

from twinfold.models.tokens import Padder, length_chunks
from twinfold.train.data.pairs import TokenizedPairs
from twinfold.train.data.plan import Batch, BatchPlan, PlanSampler


def assemble(tokens: dict[str, tuple[list[list[int]], list[int]]], padder: Padder, token_budget: int,
             max_texts: int | None = None, scores: list[list[float]] | None = None) -> dict:
    """Token ids and text keys by role (batch order) -> `{"order", "chunks", "keys"}` of one step, and `"scores"`
    [rows, 1 + k] (batch order) where the rows' teacher `scores` are given.

    Per role: `order[role][k]` is the batch position of the k-th text longest first; `chunks[role]` are
    consecutive pieces of that sorted list (see `models.tokens.length_chunks`), each padded to its longest
    (rounded up as the padder rounds), or packed into one row where the padder packs (the budget then counts
    real tokens).
    """
    out = {"order": {}, "chunks": {}, "keys": {}}
    for role, (ids, keys) in tokens.items():
        lengths = torch.tensor([len(x) for x in ids])
        order = torch.sort(lengths, descending=True, stable=True).indices
        sorted_ids = [ids[i] for i in order.tolist()]
        chunks, start = [], 0
        widths = [padder.width(n) for n in lengths[order].tolist()]  # what each text costs, padding included
        for size in length_chunks(widths, token_budget, max_texts, padder.packed):
            chunks.append(padder(sorted_ids[start:start + size]))
            start += size
        out["order"][role], out["chunks"][role] = order, chunks
        out["keys"][role] = torch.as_tensor(keys, dtype=torch.int64)
    if scores is not None:
        out["scores"] = torch.tensor(scores, dtype=torch.float32)
    return out


class StepBatches(Dataset):
    """Item `(epoch, index, batch)` of `PlanSampler` -> this process's assembled slice of that global batch."""

    def __init__(self, datasets: list[TokenizedPairs], rank: int, world: int, padder: Padder, token_budget: int,
                 max_texts: int | None):
        self.datasets, self.rank, self.world, self.padder = datasets, rank, world, padder
        self.token_budget, self.max_texts = token_budget, max_texts

    def __getitem__(self, item: tuple[int, int, Batch]) -> dict:
        epoch, index, batch = item
        rows, ds = batch.shard(self.rank, self.world), self.datasets[batch.dataset]
        step = assemble(ds.rows(rows), self.padder, self.token_budget, self.max_texts, ds.scores(rows))
        return {"epoch": epoch, "index": index, "pairs": len(batch.rows), **step}


def step_loader(batches: StepBatches, plan: BatchPlan, epoch: int, index: int, settings: dict) -> DataLoader:
    """The stream of assembled global-batch slices from the position (epoch, index) on."""
    # its own generator: creating the loader must not draw from the global RNG (dropout masks, exact resume)
    return DataLoader(batches, batch_size=None, sampler=PlanSampler(plan, epoch, index), generator=torch.Generator(),
                      **settings)


def stream_loader(steps, settings: dict) -> DataLoader:
    """A `train.streams.StreamSteps` fed inline, or by one worker process where the device has workers: a stream
    is read in order, so one worker reads, checks and tokenizes ahead of the step."""
    return DataLoader(steps, batch_size=None, generator=torch.Generator(),
                      **{**settings, "num_workers": min(1, settings["num_workers"])})
