"""The orchestrator that the DDP hook and the Horovod optimizer share: one flat gradient
through a route's stages.

Per bucket (or gradient), :func:`reduce_gradients` plans it, asks the policy for its route
(:mod:`gradsparse.engine.routes`), and runs the route's stages: ``begin``, ``compensate``,
``select`` and ``communicate`` now; ``commit`` and ``decode`` in the future's continuation
(:func:`finish`), once every sum has arrived. The parameters smaller than
``min_compress_numel`` (biases, norms) travel dense beside the route's sum, and
:func:`write` puts both into ``bucket.buffer()``.
"""

import logging
import time
from typing import Any, List, Optional, Sequence

import torch

from gradsparse.comm import PeerError, ring_allreduce_bytes
from gradsparse.payload import SparsePayload
from gradsparse.timing import stage

from .routes import BucketStep
from .state import SparseHookState

__all__ = ["end_step", "finish", "prepare", "reduce_gradients", "write"]

logger = logging.getLogger(__name__)


def prepare(state: SparseHookState, buffer: torch.Tensor, params: Sequence[torch.Tensor]) -> BucketStep:
    """Plan the bucket, precondition it (when an adaptive optimizer asked for it), let the
    policy choose its route, gather the compressed region. Nothing here may fail on one
    rank only."""
    plan = state.planner.plan(params)
    if state.preconditioner is not None:
        state.preconditioner.apply(plan.segments, buffer, vectors=plan.vectors, ranks=state.backend.size)
    decision = state.policy.decide(state.step, plan, state.backend, buffer)
    step = BucketStep(
        plan, decision, buffer, active=plan.masks.active if decision.masked else None,
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


def write(
    state: SparseHookState, step: BucketStep, averaged: Optional[torch.Tensor], small: Optional[torch.Tensor]
) -> None:
    """The averaged sums into the bucket. ``averaged`` is laid out as ``step.values``; a
    route that decoded into the region itself saves a copy, and one that wrote the bucket
    itself returns None."""
    if averaged is not None:
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
    with stage("commit"):
        finite = route.commit(state, step, values[0])
    with stage("decode"):
        averaged = route.decode(state, step, values[0])
    with stage("write"):
        write(state, step, averaged, values[1] if len(values) > 1 else None)
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
    with stage("prepare"):
        step = prepare(state, buffer, params)
    try:
        with stage("compensate"):
            step.decision.route.compensate(state, step)
        with stage("select"):
            step.decision.route.select(state, step)
    except Exception as exc:  # tell the peers before raising, so that nobody hangs
        step.failure = exc
    state.counters.compress_s += time.perf_counter() - step.started
    with stage("communicate"):
        futures = _communicate(state, step)
    dense_bytes = ring_allreduce_bytes(buffer.numel(), buffer.element_size(), state.backend.size)
    state.counters.add_traffic(before, state.backend.stats.as_dict(), dense_bytes)
    return torch.futures.collect_all(futures).then(lambda done: finish(state, step, futures, done))
