"""The sparse DDP communication hook: ``sparse_allreduce_hook(state, bucket)``, a plain
function of a picklable state and a ``GradBucket`` that returns a future of the averaged
bucket, as PyTorch's ``ddp_comm_hooks`` are. The work is the engine's
(:func:`gradsparse.engine.reduce.reduce_gradients`); this module adapts DDP's two calling
conventions (a bucket; or, under compiled DDP, one parameter at a time) and sparse
gradients (``nn.Embedding(sparse=True)``)."""

# No `from __future__ import annotations` here: DDP compares the hook's annotations
# with dist.GradBucket and torch.futures.Future[torch.Tensor] as objects.
from typing import Any

import torch
import torch.distributed as dist

from gradsparse.engine.reduce import end_step, reduce_gradients
from gradsparse.engine.state import SparseHookState

from .sparse_gradient import sparse_gradient

__all__ = ["sparse_allreduce_hook"]


@torch.compiler.disable
def _compiled_step(state: SparseHookState, grad: Any, param: Any) -> torch.futures.Future[torch.Tensor]:
    """Compiled DDP (``optimize_ddp="python_reducer"`` with compiled autograd) calls the hook
    once per parameter as ``hook(state, (param.grad, param))`` and ignores what it returns:
    the parameter is reduced as with ``scope="layer"`` and ``param.grad`` written in place.
    A step ends when a parameter comes round again. Dynamo does not trace in (the hook's
    CPU kernels are numba's, its collectives gloo's): the backward graph calls it as it is."""
    if not isinstance(grad, torch.Tensor) or not isinstance(param, torch.Tensor):
        raise TypeError(
            "sparse_allreduce_hook takes a DDP GradBucket, or (gradient, parameter) as compiled DDP passes "
            f"them; got ({type(grad).__name__}, {type(param).__name__})"
        )
    seen = state.compiled_seen
    if id(param) in seen:
        seen.clear()
        end_step(state)
    seen.add(id(param))
    if grad.layout != torch.strided:
        fut = sparse_gradient(state, grad)
        grad.copy_(fut.wait())
        return fut
    flat = grad.view(-1) if grad.is_contiguous() else grad.contiguous().view(-1)
    fut = reduce_gradients(state, flat, [param])
    fut.wait()
    if flat.data_ptr() != grad.data_ptr():
        grad.copy_(flat.view_as(grad))
    return fut


def sparse_allreduce_hook(state: SparseHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sum sparse payloads across ranks and average.

    Register with ``ddp.register_comm_hook(state, sparse_allreduce_hook)``. Under compiled
    DDP it is called per parameter with ``(param.grad, param)`` and reduces in place.
    """
    if isinstance(bucket, tuple):
        if len(bucket) != 2:
            raise TypeError(f"sparse_allreduce_hook got a tuple of {len(bucket)}; expected (gradient, parameter)")
        return _compiled_step(state, *bucket)
    buffer = bucket.buffer()
    if buffer.layout != torch.strided:
        fut = sparse_gradient(state, buffer)
    else:
        fut = reduce_gradients(state, buffer, bucket.parameters())
    if bucket.is_last():
        end_step(state)
    return fut
