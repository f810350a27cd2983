"""Small collective helpers for losses that look beyond the local batch (CRD's memory banks, DIST's global batch).

Every helper is the identity (or a no-op) when ``torch.distributed`` is not initialised, so the same loss code runs
on one process, under ``accelerate launch`` (DDP) and in the tests' 2-process gloo groups.

* :func:`all_gather_no_grad` — concatenate a tensor from every rank along dim 0, in rank order (unequal first
  dimensions are padded for the collective and trimmed afterwards); the result carries no gradient.
* :func:`all_gather_with_grad` — the same, differentiable: the backward sums the gradient of the gathered tensor over
  the ranks and returns this rank's slice. With DDP's averaging of parameter gradients this gives the gradient of the
  mean over ranks of the per-rank losses, i.e. the gradient of the global-batch loss when every rank computes the same
  global quantity.
* :func:`all_reduce_sum`, :func:`broadcast_` — no-grad conveniences.
* :func:`global_count_mean` — a sum over local items divided by the item count of the whole global batch, scaled so
  that DDP's averaging of gradients gives the gradient of the global-batch mean (detection losses over foreground
  points, pixel losses over labelled pixels: counts that differ between the processes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ['is_distributed', 'get_world_size', 'get_rank', 'all_gather_no_grad', 'all_gather_with_grad',
           'all_reduce_sum', 'broadcast_', 'global_count_mean']


def is_distributed() -> bool:
    """True when a process group is initialised (and has more than one rank or not: collectives are valid)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, equal_sizes: bool = False) -> tuple[torch.Tensor, list[int]]:
    """All ranks' ``x`` concatenated along dim 0 (rank order) and the per-rank sizes.

    ``equal_sizes``: every rank holds as many rows (a training batch: the loader drops the last partial batch and
    gives every process as many batches), so the sizes need not be exchanged, which would read them on the host.
    """
    sizes = [x.shape[0]] * get_world_size() if equal_sizes else _gather_sizes(x.shape[0], x.device)
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, equal_sizes: bool = False) -> torch.Tensor:
    """[n_r, ...] on each rank r → [Σ_r n_r, ...] on every rank, rank-major order, detached (``equal_sizes``: see
    :func:`_gather_padded`)."""
    if get_world_size() == 1:
        return x.detach()
    return _gather_padded(x.detach(), equal_sizes)[0]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, equal_sizes: bool) -> torch.Tensor:
        gathered, sizes = _gather_padded(x, equal_sizes)
        ctx.sizes, ctx.rank = sizes, get_rank()
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss may depend on this rank's rows
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, equal_sizes: bool = False) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (rank-major); the identity on one process (``equal_sizes``: see
    :func:`_gather_padded`).

    Every rank must call backward through the result (it is a collective), which DDP training does.
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x, equal_sizes)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks (a new tensor; the input is unchanged)."""
    out = x.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` in place with rank ``src``'s value."""
    if get_world_size() > 1:
        dist.broadcast(x, src=src)
    return x


def global_count_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """W·S_p / max(1, Σ_q n_q): process p's share of the global-batch mean Σ_q S_q / max(1, Σ_q n_q).

    DDP averages the processes' gradients (÷ W), so the gradient applied is that of Σ_q S_q / max(1, Σ_q n_q), the
    loss one process computes on the whole global batch; and the mean over the processes of the returned values (what
    the term meter logs) is that loss too. Dividing each S_p by its own n_p instead would weight a process's items by
    1/n_p: a different loss whenever the counts differ. The global count is the normaliser of FCOS as mmdetection
    trains it (``reduce_mean(num_pos)``); torchvision's FCOS divides by the local count.

    Args:
        local_sum: S_p, a scalar with gradient.
        local_count: n_p, a scalar count (no gradient).

    Returns:
        a scalar; on one process S / max(1, n).
    """
    total = all_reduce_sum(local_count.to(local_sum.dtype))
    return local_sum * get_world_size() / total.clamp(min=1)
