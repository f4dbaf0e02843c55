"""The sparse DDP communication hook: a short orchestrator over route objects.

``sparse_allreduce_hook(state, bucket)`` follows PyTorch's ``ddp_comm_hooks``: a plain
function of a picklable state and a ``GradBucket`` that returns a future of the averaged
bucket. Per bucket, :func:`reduce_gradients` plans it, asks the policy for its route
(:mod:`gradsparse.ddp.routes`), and runs the route's stages: ``begin``, ``compensate``,
``select`` and ``communicate`` now; ``commit`` and ``decode`` in the future's continuation
(:func:`finish`), once every sum has arrived. The parameters smaller than
``min_compress_numel`` (biases, norms) travel dense beside the route's sum, and
:func:`write` puts both into ``bucket.buffer()``.
"""

# No `from __future__ import annotations` here: DDP compares the hook's annotations
# with dist.GradBucket and torch.futures.Future[torch.Tensor] as objects.
import logging
import time
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from gradsparse.comm import PeerError, ring_allreduce_bytes
from gradsparse.payload import SparsePayload

from .routes import BucketStep
from .sparse_gradient import sparse_gradient
from .state import SparseHookState

__all__ = ["end_step", "finish", "prepare", "reduce_gradients", "sparse_allreduce_hook", "write"]

logger = logging.getLogger(__name__)


def prepare(state: SparseHookState, buffer: torch.Tensor, params: Sequence[torch.Tensor]) -> BucketStep:
    """Plan the bucket, precondition it (when an adaptive optimizer asked for it), let the
    policy choose its route, gather the compressed region. Nothing here may fail on one
    rank only."""
    plan = state.planner.plan(params)
    if state.preconditioner is not None:
        state.preconditioner.apply(plan.segments, buffer)
    decision = state.policy.decide(state.step, plan, state.backend, buffer)
    region = plan.gather(buffer)
    step = BucketStep(
        plan, decision, buffer, region, values=region, active=plan.masks.active if decision.masked else None,
        payload=SparsePayload.empty(decision.work_numel, buffer), started=time.perf_counter(),
    )  # fmt: skip
    decision.route.begin(state, step)
    return step


def _communicate(state: SparseHookState, step: BucketStep) -> List[torch.futures.Future[Any]]:
    """Start the route's sum, then the small parameters' dense one."""
    try:
        futures = [step.decision.route.communicate(state, step)]
    except PeerError:
        if step.failure is not None:  # this rank is the one that failed: raise its own error
            raise step.failure from None
        raise
    small = step.plan.small_values(step.buffer)
    if small is not None:
        # The route's exchange validated this bucket already. Rank order: the small parameters'
        # place in the bucket changes when DDP rebuilds its buckets, and their bits must not.
        futures.append(state.collective.reduce_dense(small, state.backend, validate=False, rank_order=True))
    step.sent_at = time.perf_counter()
    return futures


def write(state: SparseHookState, step: BucketStep, averaged: torch.Tensor, small: Optional[torch.Tensor]) -> None:
    """The averaged sums into the bucket. ``averaged`` is laid out as ``step.values``; a
    route that decoded into the region itself saves a copy."""
    if step.active is not None:  # masked coordinates get no gradient
        step.region.zero_().index_copy_(0, step.active, averaged)
    elif averaged.data_ptr() != step.region.data_ptr():
        step.region.copy_(averaged)
    step.plan.scatter(step.buffer, step.region)
    if small is not None:
        step.plan.write_small(step.buffer, small, state.backend.size)


def finish(
    state: SparseHookState,
    step: BucketStep,
    futures: List[torch.futures.Future[Any]],
    collected: torch.futures.Future[Any],
) -> torch.Tensor:
    """The continuation: commit, decode and write once every sum has arrived. ``collected``
    is ``collect_all(futures)``, which completes early, with the error, when one of them
    fails (a timeout, a lost peer): its error is raised first, before any future that may
    still be pending is read."""
    try:
        collected.value()
        values = [fut.value() for fut in futures]  # re-raises a failed collective
    except Exception:  # a PeerError, wrapped by torch when raised in a callback
        if step.failure is not None:  # this rank is the one that failed: raise its own error
            raise step.failure from None
        raise
    arrived = time.perf_counter()
    counters, route = state.counters, step.decision.route
    counters.communicate_s += arrived - step.sent_at
    finite = route.commit(state, step, values[0])
    write(state, step, route.decode(state, step, values[0]), values[1] if len(values) > 1 else None)
    counters.compressible += step.decision.work_numel
    counters.nonfinite_buckets += int(not finite)
    counters.decompress_s += time.perf_counter() - arrived
    return step.buffer


def end_step(state: SparseHookState) -> None:
    """Count a finished step (after its last bucket) and log the summary when due."""
    state.step += 1
    state.counters.steps += 1
    every = state.options.log_every
    if every and state.step % every == 0 and state.backend.rank == 0:
        logger.info(state.counters.log_line())


def reduce_gradients(
    state: SparseHookState, buffer: torch.Tensor, params: Sequence[torch.Tensor]
) -> torch.futures.Future[torch.Tensor]:
    """Every stage for one flat gradient ``buffer`` holding ``params`` in order: a future of
    the buffer, averaged across ranks, once the continuation has written it. Every rank must
    call it for the same parameters in the same order."""
    before = state.backend.stats.as_dict()
    step = prepare(state, buffer, params)
    try:
        step.decision.route.compensate(state, step)
        step.decision.route.select(state, step)
    except Exception as exc:  # tell the peers before raising, so that nobody hangs
        step.failure = exc
    state.counters.compress_s += time.perf_counter() - step.started
    futures = _communicate(state, step)
    dense_bytes = ring_allreduce_bytes(buffer.numel(), buffer.element_size(), state.backend.size)
    state.counters.add_traffic(before, state.backend.stats.as_dict(), dense_bytes)
    return torch.futures.collect_all(futures).then(lambda done: finish(state, step, futures, done))


def _compiled_step(state: SparseHookState, grad: Any, param: Any) -> torch.futures.Future[torch.Tensor]:
    """Compiled DDP (``optimize_ddp="python_reducer"`` with compiled autograd) calls the hook
    once per parameter as ``hook(state, (param.grad, param))`` and ignores what it returns:
    the parameter is reduced as with ``scope="layer"`` and ``param.grad`` written in place.
    A step ends when a parameter comes round again."""
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
