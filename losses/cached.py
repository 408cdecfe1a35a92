"""Forward, loss and backward of one contrastive batch: whole, or cached in mini-batches (GradCache).
Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".

Both steps take the same arguments and leave the same gradients in the parameters' `.grad` (accumulating,
like `loss.backward()`):

- `chunks` maps each role ("anchor", "positive", "negative") to its inputs cut into chunks (whatever `embed`
  takes: a padded group of token ids, or a list of texts); the role's embeddings are the chunks' in order;
- `embed(chunk, role) -> Tensor [n, d]` runs the (possibly DDP-wrapped) model on one chunk with gradients enabled;
- `loss_fn(embeddings, keys) -> scalar`, e.g. `InfoNCE` or `Matryoshka(InfoNCE)`;
- `scale` multiplies the loss before backward (e.g. 1 / gradient-accumulation steps);
- `backward(tensor)` runs the backward of the scaled loss (default `Tensor.backward`; pass
  `accelerator.backward` for mixed-precision loss scaling; it also divides by the Accelerator's own
  `gradient_accumulation_steps`, so use that or `scale`, not both).

Cached mode: (1) embed every chunk without gradients, remembering the RNG state
before each chunk; (2) compute the loss over the whole batch on detached copies and backpropagate it to them
(and to any loss parameter); (3) re-embed each chunk with gradients under its remembered RNG state (same
dropout masks, same embeddings) and backpropagate the cached embedding gradients into the model. Only one
chunk's activations are alive at a time, so peak memory grows with the chunk size, not the batch size.
The result is the gradient of the same loss: a whole-batch forward draws different dropout masks, so it
equals the plain autograd step over the same chunks from the same RNG state (and with dropout 0, the plain
whole-batch step). The global RNG state afterwards is the same as after that plain step.

That equality rests on each re-embedded chunk reproducing its cached embeddings: a device whose no-grad and
grad passes pick kernels that draw dropout differently would make the gradients silently wrong. With
`check_replay` (on by default in this function; off by default in runs, `loss.check_replay`, as it costs a
device sync per step) every replayed chunk is compared with its cached embeddings, and a mismatch raises
`ReplayMismatch`.
"""
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager

import torch

Embed = Callable[[Any, str], torch.Tensor]
# Largest |replayed - cached| allowed, relative to the chunk's largest |cached| entry. Another kernel's
# rounding passes, in bf16 too (the output dtype does not tell the compute precision under autocast); another
# dropout mask does not: on the tiny test BERT it moves embeddings by 0.19 (dropout 0.1) and 0.11 (0.01).
REPLAY_TOLERANCE = 3e-2


class ReplayMismatch(RuntimeError):
    """A chunk re-embedded with gradients differs from its cached embeddings: the step's gradients would be wrong."""
LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor] | None], torch.Tensor]


def uncached_backward(embed: Embed, chunks: dict[str, list], loss_fn: LossFn, *,
                      keys: dict[str, torch.Tensor] | None = None, scale: float = 1.0,
                      backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Embed every chunk with gradients, backpropagate `scale * loss`; return the unscaled loss, detached."""
    embeddings = {role: torch.cat([embed(chunk, role) for chunk in role_chunks])
                  for role, role_chunks in chunks.items()}
    loss = loss_fn(embeddings, keys)
    (backward or torch.Tensor.backward)(loss * scale)
    return loss.detach()


def cached_backward(embed: Embed, chunks: dict[str, list], loss_fn: LossFn, *,
                    keys: dict[str, torch.Tensor] | None = None, scale: float = 1.0,
                    backward: Callable[[torch.Tensor], None] | None = None,
                    no_sync: Callable[[], ContextManager] | None = None, check_replay: bool = True) -> torch.Tensor:
    """GradCache step (see module docstring); return the unscaled loss, detached.

    `no_sync()` (e.g. `lambda: accelerator.no_sync(model)`) wraps the re-forward and backward of every chunk
    but the last, so DDP all-reduces the accumulated gradients once. `check_replay`: raise `ReplayMismatch`
    (after the backward, before any optimizer step) if a replayed chunk differs from its cached embeddings.
    """
    work = [(role, chunk) for role, role_chunks in chunks.items() for chunk in role_chunks]
    states, pieces = [], {role: [] for role in chunks}
    with torch.no_grad():
        for role, chunk in work:
            states.append(_RngState())
            pieces[role].append(embed(chunk, role))
    starts = [start for role in chunks for start in _offsets(pieces[role])]
    cached = {role: torch.cat(p).requires_grad_() for role, p in pieces.items()}
    loss = loss_fn(cached, keys)
    (backward or torch.Tensor.backward)(loss * scale)
    unused = [role for role, e in cached.items() if e.grad is None]
    if unused:
        raise ValueError(f"the loss does not use role(s) {unused}; drop them from `chunks`")

    differences = []
    for i, ((role, chunk), start) in enumerate(zip(work, starts)):
        sync = nullcontext() if no_sync is None or i == len(work) - 1 else no_sync()
        with sync, states[i].replay():
            embeddings = embed(chunk, role)
            rows = slice(start, start + len(embeddings))
            if check_replay:
                differences.append(_relative_difference(embeddings.detach(), cached[role][rows]))
            embeddings.backward(cached[role].grad[rows].to(embeddings.dtype))
    if differences:
        sizes = [len(piece) for role in chunks for piece in pieces[role]]
        _check_replay(torch.stack(differences).tolist(),
                      [(role, start, size) for (role, _), start, size in zip(work, starts, sizes)])
    return loss.detach()


def chunked(items: dict[str, list], size: int | None = None) -> dict[str, list[list]]:
    """Each role's items cut into consecutive chunks of `size` (None: one chunk per role)."""
    if size is not None and size < 1:
        raise ValueError(f"chunk size must be >= 1; got {size}")
    return {role: [rows[s:s + (size or len(rows))] for s in range(0, len(rows), size or max(1, len(rows)))]
            for role, rows in items.items()}


def _offsets(pieces: list[torch.Tensor]) -> list[int]:
    """Row at which each piece starts in their concatenation."""
    starts, total = [], 0
    for piece in pieces:
        starts.append(total)
        total += len(piece)
    return starts


def _relative_difference(replayed: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """max |replayed - cached| over max |cached| (a device scalar: no sync)."""
    cached = cached.detach().float()
    return (replayed.float() - cached).abs().max() / cached.abs().max().clamp(min=1e-12)


def _check_replay(differences: list[float], where: list[tuple[str, int, int]]) -> None:
    """Raise `ReplayMismatch` naming the worst chunk (`where[i]`: role, first row, rows) if it is off."""
    worst = max(range(len(differences)), key=differences.__getitem__)
    if differences[worst] > REPLAY_TOLERANCE:
        role, start, size = where[worst]
        raise ReplayMismatch(
            f"cached mode: re-embedding {role} rows {start}..{start + size - 1} gave embeddings that differ "
            f"from the cached ones by {differences[worst]:.3g} (relative; at most {REPLAY_TOLERANCE:g}), so this "
            "step's gradients would be wrong; the no-grad and grad passes must draw the same dropout: set "
            "model.dropout: 0.0, or loss.mini_batch_size: null on this device")


class _RngState:
    """The CPU (and current accelerator device's) RNG state, captured now and replayable later."""

    def __init__(self):
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        self.device_type = accelerator.type if accelerator is not None else None
        self.devices = [torch.accelerator.current_device_index()] if accelerator is not None else []
        self.cpu = torch.get_rng_state()
        self.device_states = [torch.get_device_module(self.device_type).get_rng_state(d) for d in self.devices]

    @contextmanager
    def replay(self):
        """Run the block from the captured state; restore the current state afterwards."""
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.device_states):
                torch.get_device_module(self.device_type).set_rng_state(state, device)
            yield
