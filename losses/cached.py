"""Forward, loss and backward of one contrastive batch: whole, or cached in mini-batches (GradCache).
Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".

Both steps take the same arguments and leave the same gradients in the parameters' `.grad` (accumulating,
like `loss.backward()`):

- `embed(texts, role) -> Tensor [n, d]` runs the (possibly DDP-wrapped) model with gradients enabled;
- `texts` maps each role ("anchor", "positive", "negative") to its list of texts;
- `loss_fn(embeddings, keys) -> scalar`, e.g. `InfoNCE` or `Matryoshka(InfoNCE)`;
- `scale` multiplies the loss before backward (e.g. 1 / gradient-accumulation steps);
- `backward(tensor)` runs the backward of the scaled loss (default `Tensor.backward`; pass
  `accelerator.backward` for mixed-precision loss scaling; it also divides by the Accelerator's own
  `gradient_accumulation_steps`, so use that or `scale`, not both).

Cached mode: (1) embed every chunk of `mini_batch_size` texts without gradients, remembering the RNG state
before each chunk; (2) compute the loss over the whole batch on detached copies and backpropagate it to them
(and to any loss parameter); (3) re-embed each chunk with gradients under its remembered RNG state (same
dropout masks, same embeddings) and backpropagate the cached embedding gradients into the model. Only one
chunk's activations are alive at a time, so peak memory grows with `mini_batch_size`, not the batch size.
The result is the gradient of the same loss: a whole-batch forward draws different dropout masks, so it
equals the plain autograd step over the same chunks from the same RNG state (and with dropout 0, the plain
whole-batch step). The global RNG state afterwards is the same as after that plain step.
"""
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager

import torch

Embed = Callable[[list[str], str], torch.Tensor]
LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor] | None], torch.Tensor]


def uncached_backward(embed: Embed, texts: dict[str, list[str]], loss_fn: LossFn, *,
                      keys: dict[str, torch.Tensor] | None = None, scale: float = 1.0,
                      backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Embed every role in one forward each, backpropagate `scale * loss`; return the unscaled loss, detached."""
    loss = loss_fn({role: embed(batch, role) for role, batch in texts.items()}, keys)
    (backward or torch.Tensor.backward)(loss * scale)
    return loss.detach()


def cached_backward(embed: Embed, texts: dict[str, list[str]], loss_fn: LossFn, mini_batch_size: int, *,
                    keys: dict[str, torch.Tensor] | None = None, scale: float = 1.0,
                    backward: Callable[[torch.Tensor], None] | None = None,
                    no_sync: Callable[[], ContextManager] | None = None) -> torch.Tensor:
    """GradCache step (see module docstring); return the unscaled loss, detached.

    `no_sync()` (e.g. `lambda: accelerator.no_sync(model)`) wraps the re-forward and backward of every chunk
    but the last, so DDP all-reduces the accumulated gradients once.
    """
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1; got {mini_batch_size}")
    chunks = [(role, start, batch[start:start + mini_batch_size])
              for role, batch in texts.items() for start in range(0, len(batch), mini_batch_size)]

    states, pieces = [], {role: [] for role in texts}
    with torch.no_grad():
        for role, _, chunk in chunks:
            states.append(_RngState())
            pieces[role].append(embed(chunk, role))
    cached = {role: torch.cat(p).requires_grad_() for role, p in pieces.items()}
    loss = loss_fn(cached, keys)
    (backward or torch.Tensor.backward)(loss * scale)
    unused = [role for role, e in cached.items() if e.grad is None]
    if unused:
        raise ValueError(f"the loss does not use role(s) {unused}; drop them from `texts`")

    for i, (role, start, chunk) in enumerate(chunks):
        sync = nullcontext() if no_sync is None or i == len(chunks) - 1 else no_sync()
        with sync, states[i].replay():
            embeddings = embed(chunk, role)
            embeddings.backward(cached[role].grad[start:start + len(chunk)].to(embeddings.dtype))
    return loss.detach()


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
