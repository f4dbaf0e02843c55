"""The sparse DDP communication hook, as named stages.

``sparse_allreduce_hook(state, bucket)`` follows PyTorch's ``ddp_comm_hooks``: a plain
function of a picklable state and a ``GradBucket`` that returns a future of the averaged
bucket. Per bucket:

1. :func:`prepare`: plan the bucket, let the policy decide its route, gather the
   compressed region, check it is finite, compensate it with error feedback, apply masks;
2. :func:`select`: the compressor picks the sparse payload (sparse route only);
3. :func:`communicate`: the collective sums the payloads (or, dense route, the region)
   and the small parameters go through the collective's dense path;
4. :func:`commit` (in the future's continuation :func:`finish`): once the sum is known
   and finite, error feedback keeps what was not sent;
5. :func:`write`: the averaged sum goes into ``bucket.buffer()``.

Parameters smaller than ``min_compress_numel`` (biases, norms) skip compression.
"""

# No `from __future__ import annotations` here: DDP compares the hook's annotations
# with dist.GradBucket and torch.futures.Future[torch.Tensor] as objects.
import logging
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradsparse.comm import PeerError, Reduced, SharedTopkCollective, ring_allreduce_bytes
from gradsparse.payload import SparsePayload

from .plan import BucketPlan
from .policy import Decision
from .shared import reduce_shared
from .sparse_gradient import sparse_gradient
from .state import SparseHookState

__all__ = [
    "BucketStep",
    "commit",
    "communicate",
    "compensate",
    "end_step",
    "finish",
    "prepare",
    "reduce_gradients",
    "select",
    "sparse_allreduce_hook",
    "write",
]

logger = logging.getLogger(__name__)


@dataclass
class BucketStep:
    """One bucket's way through the stages."""

    plan: BucketPlan
    decision: Decision
    buffer: torch.Tensor  # the bucket: input gradients, output averages
    region: torch.Tensor  # its compressed parameters: gradients in, averages out
    work: torch.Tensor  # what is selected over or sent: the compensated region, or its active values
    active: Optional[torch.Tensor]  # indices of the region's unmasked coordinates
    payload: SparsePayload
    large: Optional[Tuple[float, torch.Tensor]] = None  # (floor, indices of |work| >= floor)
    scale: float = 1.0
    velocity: Optional[torch.Tensor] = None
    nonfinite: bool = False
    idle: Tuple[str, ...] = ()  # parameters that received no gradient: their state is kept
    failure: Optional[BaseException] = None
    leader: Optional[int] = None  # shared_topk: the rank that selects for this bucket
    started: float = 0.0
    sent_at: float = 0.0


def _is_finite(tensor: torch.Tensor) -> bool:
    """One read pass and no temporary: NaN propagates to both the minimum and the maximum,
    and +-inf shows up as one of them."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def prepare(state: SparseHookState, buffer: torch.Tensor, params: Sequence[torch.Tensor]) -> BucketStep:
    """Plan and decide, then gather the region. Nothing here may fail on one rank only."""
    plan = state.planner.plan(params)
    decision = state.policy.decide(state.step, plan, state.backend, buffer)
    region = plan.gather(buffer)
    active = plan.masks.active if decision.masked else None
    payload = SparsePayload.empty(decision.work_numel, buffer)
    step = BucketStep(plan, decision, buffer, region, region, active, payload, started=time.perf_counter())
    if isinstance(state.collective, SharedTopkCollective) and not decision.dense:
        step.leader = state.collective.leader(state.rounds, state.backend.size)
        state.rounds += 1  # the same on every rank: every rank reduces the same buckets
    return step


def _selects(state: SparseHookState, step: BucketStep) -> bool:
    """Whether this rank selects for the bucket: always, except under ``shared_topk``,
    where only the round's leader does."""
    return step.leader is None or step.leader == state.backend.rank


def _compensate_fused(state: SparseHookState, step: BucketStep) -> bool:
    """The sparse route in one compiled pass over the region (CPU, numba): the scan, the
    compensation, and the gathering of the entries the compressor will choose from (above
    its candidate floor). False when it does not apply, and nothing was done."""
    plan, compressor = step.plan, step.decision.compressor
    if step.active is not None or not state.options.error_feedback or state.compressor.state_buffers:
        return False
    scale, feedback = state.grad_scale(), state.feedback
    if not feedback.can_fuse(step.region):
        return False

    def values_at(positions: torch.Tensor) -> torch.Tensor:
        return feedback.compensated_at(plan.layout, step.region, positions, scale)

    floor = None
    if _selects(state, step):
        floor = state.selection.candidate_floor(compressor, plan.key, plan.layout, step.region, values_at)
    found = feedback.compensate_scan(plan.layout, step.region, scale, floor, plan.scratch)
    if found is None:
        return False
    finite, step.idle, large, step.work = found
    step.scale = scale
    if not finite or not plan.scan(step.buffer, check_finite=True, compressed=False)[0]:
        step.nonfinite = True
    elif floor is not None and large is not None:
        step.large = (floor, large)
    return True


def compensate(state: SparseHookState, step: BucketStep) -> None:
    """Scan the bucket (finiteness on the sparse route: a dense one carries NaN/inf in its
    sum; parameters without a gradient), observe, add the residual, and restrict to the
    active coordinates of the masks."""
    plan, layout, dense = step.plan, step.plan.layout, step.decision.dense
    feedback, enabled = state.feedback, state.options.error_feedback
    if not dense and step.region.numel() and _compensate_fused(state, step):
        return
    if not dense or (enabled and not feedback.is_zero(layout)):
        finite, step.idle = plan.scan(step.buffer, check_finite=not dense)
        if not finite:
            step.nonfinite = True
            return
    if not step.region.numel():
        return
    state.selection.observe(state.compressor, plan.key, layout, step.region, state.step)
    step.scale = state.grad_scale()
    if enabled:
        step.velocity = feedback.compensate(layout, step.region, step.scale, keep=step.idle)
    if step.active is not None:
        assert plan.masks.flat is not None
        step.region.mul_(plan.masks.flat)  # masked coordinates: no gradient, no residual
        step.work = step.region[step.active]


def select(state: SparseHookState, step: BucketStep) -> None:
    """The compressor's payload over the work tensor (sparse route only)."""
    if step.decision.dense or step.nonfinite or not step.region.numel() or not _selects(state, step):
        return
    plan = step.plan
    layout = plan.layout if step.active is None else plan.masks.layout
    step.payload = state.selection.compress(
        step.decision.compressor, plan.key, layout, step.work, state.step, large=step.large
    )


def communicate(state: SparseHookState, step: BucketStep) -> List[torch.futures.Future[Any]]:
    """Start the sums: the region (sparse or dense) and the small parameters."""
    backend, collective = state.backend, state.collective
    failed = step.failure is not None
    try:
        if step.decision.dense:
            main: torch.futures.Future[Any] = collective.reduce_dense(step.work, backend, failed=failed)
        elif step.leader is not None:
            assert isinstance(collective, SharedTopkCollective) and step.decision.budget is not None
            mine = step.payload if step.leader == backend.rank else None
            step.payload, main = reduce_shared(
                collective, backend, step.work, mine, leader=step.leader, capacity=step.decision.budget,
                nonfinite=step.nonfinite, failed=failed, context=step.plan.context,
            )  # fmt: skip
        else:
            main = collective.reduce(
                step.payload, backend, context=step.plan.context, nonfinite=step.nonfinite, failed=failed
            )
    except PeerError:
        if step.failure is not None:  # this rank is the one that failed: raise its own error
            raise step.failure from None
        raise
    futures = [main]
    small = step.plan.small_values(step.buffer)
    if small is not None:
        # The exchange above validated this bucket already. Rank order: the small parameters'
        # place in the bucket changes when DDP rebuilds its buckets, and their bits must not.
        futures.append(collective.reduce_dense(small, backend, validate=False, rank_order=True))
    step.sent_at = time.perf_counter()
    return futures


def commit(state: SparseHookState, step: BucketStep, main: Any) -> torch.Tensor:
    """Keep what was not sent, once the sum is known finite; return the averaged work."""
    feedback, enabled = state.feedback, state.options.error_feedback
    layout, region, world = step.plan.layout, step.region, state.backend.size
    counters = state.counters
    if step.decision.dense:
        nothing_kept = not enabled or feedback.is_zero(layout)
        finite = nothing_kept or _is_finite(step.work)  # the same bits, so the same verdict everywhere
        if finite and enabled:
            feedback.clear(layout, region, step.scale, keep=step.idle)
        counters.selected += step.decision.work_numel
        result = main.div_(world)
    else:
        reduced: Reduced = main
        state.policy.learn(step.plan.key, reduced.counts)
        finite = not reduced.nonfinite
        # Commit only now: if any rank overflowed, AMP skips this step everywhere, so the
        # residual must stay as it was. A lossy collective reports which entries made it.
        payload = step.payload
        kept = reduced.kept if reduced.kept is not None and payload.count else None
        indices = payload.indices if kept is None else payload.indices[kept]
        values = payload.values if kept is None else payload.values[kept]
        if step.active is not None:  # back from active coordinates to the region
            indices = step.active[indices.long()].to(payload.indices.dtype)
        if finite and enabled and region.numel():
            sent = SparsePayload(indices, values, region.numel())
            compensated = step.work if step.active is None else region
            feedback.update(layout, compensated, sent, step.scale, step.velocity, keep=step.idle)
        counters.selected += int(indices.numel())
        out = region if step.active is None else torch.empty_like(step.work)
        result = reduced.write(out, scale=1.0 / world)  # averaged as it is added
    counters.compressible += step.decision.work_numel
    counters.nonfinite_buckets += int(not finite)
    return result


def write(state: SparseHookState, step: BucketStep, result: torch.Tensor, small: Optional[torch.Tensor]) -> None:
    """The averaged sums into the bucket."""
    if step.active is not None:  # masked coordinates get no gradient
        step.region.zero_().index_copy_(0, step.active, result)
    step.plan.scatter(step.buffer, step.region)
    if small is not None:
        step.plan.write_small(step.buffer, small, state.backend.size)


def finish(
    state: SparseHookState,
    step: BucketStep,
    futures: List[torch.futures.Future[Any]],
    collected: torch.futures.Future[Any],
) -> torch.Tensor:
    """The continuation: commit and write once every sum has arrived. ``collected`` is
    ``collect_all(futures)``, which completes early, with the error, when one of them fails
    (a timeout, a lost peer): its error is raised first, before any future that may still be
    pending is read."""
    try:
        collected.value()
        values = [fut.value() for fut in futures]  # re-raises a failed collective
    except Exception:  # a PeerError, wrapped by torch when raised in a callback
        if step.failure is not None:  # this rank is the one that failed: raise its own error
            raise step.failure from None
        raise
    arrived = time.perf_counter()
    state.counters.communicate_s += arrived - step.sent_at
    result = commit(state, step, values[0])
    write(state, step, result, values[1] if len(values) > 1 else None)
    state.counters.decompress_s += time.perf_counter() - arrived
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
    backend = state.backend
    before = backend.stats.as_dict()
    step = prepare(state, buffer, params)
    try:
        compensate(state, step)
        select(state, step)
    except Exception as exc:  # tell the peers before raising, so that nobody hangs
        step.failure = exc
    state.counters.compress_s += time.perf_counter() - step.started
    futures = communicate(state, step)
    dense_bytes = ring_allreduce_bytes(buffer.numel(), buffer.element_size(), backend.size)
    state.counters.add_traffic(before, backend.stats.as_dict(), dense_bytes)
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
