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
"""
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager

import torch

Embed = Callable[[Any, str], torch.Tensor]
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
                    no_sync: Callable[[], ContextManager] | None = None) -> torch.Tensor:
    """GradCache step (see module docstring); return the unscaled loss, detached.

    `no_sync()` (e.g. `lambda: accelerator.no_sync(model)`) wraps the re-forward and backward of every chunk
    but the last, so DDP all-reduces the accumulated gradients once.
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

    for i, ((role, chunk), start) in enumerate(zip(work, starts)):
        sync = nullcontext() if no_sync is None or i == len(work) - 1 else no_sync()
        with sync, states[i].replay():
            embeddings = embed(chunk, role)
            embeddings.backward(cached[role].grad[start:start + len(embeddings)].to(embeddings.dtype))
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
