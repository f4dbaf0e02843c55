"""Sparse gradients (``nn.Embedding(sparse=True)``): DDP gives each its own bucket, and
they go through DDP's own sparse path."""

# No `from __future__ import annotations`: kept like the hook module it serves.
import torch
import torch.distributed as dist

from gradsparse.comm import completed_future, ring_allreduce_bytes
from gradsparse.engine.state import SparseHookState

__all__ = ["sparse_gradient"]


def sparse_gradient(state: SparseHookState, grad: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """A sparse gradient (``nn.Embedding(sparse=True)``; DDP gives it a bucket of its own):
    DDP's own sparse path, which sums coalesced (row index, row) pairs across ranks. It is
    already sparse, so nothing is selected and nothing is kept back."""
    if state.preconditioner is not None:
        raise ValueError(
            "gradsparse.optim.SparseAdamW does not support sparse gradients (nn.Embedding(sparse=True)); "
            "use a dense embedding, or torch.optim.SparseAdam for it"
        )
    backend = state.backend
    world = backend.size
    coalesced = grad.coalesce()
    nbytes = coalesced._indices().numel() * 8 + coalesced._values().numel() * coalesced.element_size()
    state.counters.bytes_sent += (world - 1) * nbytes  # gloo sums sparse tensors by allgather
    state.counters.messages += world - 1
    state.counters.dense_bytes += ring_allreduce_bytes(grad.numel(), grad.element_size(), world)
    coalesced = coalesced.div_(world)
    if world == 1:
        return completed_future(coalesced)
    work = dist.all_reduce(coalesced, group=state.process_group, async_op=True)
    return work.get_future().then(lambda f: f.value()[0])
