"""Cross-process gathering for contrastive losses: every process sees every process's candidates.

All helpers are the identity when `torch.distributed` is not initialised or has one process, so losses call
them unconditionally. Every process must pass tensors of the same shape (the sampler gives each process the
same number of rows), and every process must call them in the same order.

Why the mean over *local* anchors is exactly right (N processes x B pairs == 1 process x N*B pairs):

Let L = 1/(N*B) * sum_i l_i be the 1-process loss over all N*B anchors, where l_i depends on anchor i and on
all candidates. Process r computes L_r = 1/B * sum_{i local to r} l_i over the *gathered* candidates, so
sum_r L_r = N * L. Write e_r for the embeddings process r produced (its anchors and its share of candidates).

- `gather_with_grad` is an all-gather whose backward sums the incoming gradients over processes and hands
  each process its own slice, so the gradient that reaches e_r on process r is sum_s dL_s/de_r
  = d(sum_s L_s)/de_r = N * dL/de_r (the local anchors' own term is part of that sum: their l_i live in L_r).
- Process r backpropagates that into the shared weights: g_r = N * dL/de_r * de_r/dtheta.
- DDP averages: g = 1/N * sum_r g_r = sum_r dL/de_r * de_r/dtheta = dL/dtheta, the 1-process gradient.

So no extra factor is needed: the per-process loss is the plain mean over local anchors, gathered candidates
carry gradients, and DDP's averaging cancels the N that the summed backward introduces. A parameter of the
loss itself (a learnable temperature) is not inside DDP, so its gradient dL_r/dtau must be averaged by hand:
1/N * sum_r dL_r/dtau = dL/dtau; `average_gradient` does that. The loss value to log is the mean of L_r over
processes, which equals L.

Backward uses all_reduce (supported by gloo and NCCL) and keeps this process's rows; torch's own
`torch.distributed.nn.functional.all_gather` is deprecated in torch 2.13 and computes the same thing.
"""
import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes taking part (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index (0 when not distributed)."""
    return dist.get_rank() if world_size() > 1 else 0


def rank_offset(local_batch: int) -> int:
    """Row of this process's first local row inside a gathered tensor."""
    return rank() * local_batch


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over processes and keeps this process's rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.rows = t.shape[0]
        return _all_gather(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(0, rank_offset(ctx.rows), ctx.rows)


class _AverageGradient(torch.autograd.Function):
    """Identity; backward replaces the gradient by its mean over processes."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / world_size()


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` [n, ...] from every process in rank order -> [world*n, ...], gradients flowing back."""
    return _GatherWithGrad.apply(t) if world_size() > 1 else t


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` [n, ...] from every process in rank order, without gradients (e.g. text keys)."""
    return _all_gather(t.detach()) if world_size() > 1 else t


def average_gradient(t: torch.Tensor) -> torch.Tensor:
    """Identity whose backward averages the gradient over processes (for loss parameters outside DDP)."""
    return _AverageGradient.apply(t) if world_size() > 1 else t
