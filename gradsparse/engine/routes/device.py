"""The sync-free device route: fixed-size messages, and no host read of a device value.

On a GPU every ``.item()``, ``nonzero`` or message whose size depends on the data stalls
the host until the stream drains, and NCCL has no variable-size gather. This route is built
so that neither happens:

- selection has a size every rank knows: ``k = density x numel`` for the fixed-budget
  compressors (``topk`` and ``sampled_topk`` by ``torch.topk``; ``randomk`` by a stratified
  draw on the device);
- each rank's message is ``[header | k values | k indices]`` in one byte tensor of a fixed
  size, gathered by an equal-size allgather (``shared_topk``: the leader's k indices by a
  broadcast, then ``[header | k values]``);
- the header's flag word carries "my gradient is not finite" and "I failed"; after the
  wait they are acted on by device operations: the sum comes out NaN (so AMP skips the
  step everywhere) and error feedback keeps its state, by ``torch.where``, never by a
  branch on the host;
- the flags also reach the host by a copy that is read only once it has completed (a CUDA
  event's ``query()``): a failed peer raises :class:`~gradsparse.comm.PeerError` on every
  rank, right away on CPU and within a step or two on a GPU.

The collective's job (a payload in, an exact sum out) is done here with the backend's
equal-size primitives; sums are formed in rank order, so replicas stay bit-identical.
A parameter that received no gradient (all zeros as DDP hands it over: a branch no forward
used, under ``find_unused_parameters``) is found on the device, before compensation, and
sends nothing: its entries rank last in the top-k and are sent as zeros if they are chosen
anyway (a random choice, the leader's indices, a budget over the nonzero entries), so its
residual stays whole. DDP does not copy a result into the gradient of a parameter that no
rank used, so anything sent for it would be lost.
"""

from __future__ import annotations

import itertools
import zlib
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from gradsparse import compressors
from gradsparse.buffers import reusable
from gradsparse.comm import AllgatherCollective, Collective, SharedTopkCollective, fixed
from gradsparse.error_feedback import fused
from gradsparse.payload import SparsePayload, index_dtype_for

from .route import BucketStep, Route, register_route

if TYPE_CHECKING:
    from ..state import SparseHookState

__all__ = [
    "FIXED_BUDGET", "HOST_SYNCING_OPS", "DeviceRoute", "act_on_flags", "stratified_indices", "supports", "without_idle",
]  # fmt: skip

#: the compressors whose payload size every rank knows without asking
FIXED_BUDGET = ("topk", "sampled_topk", "randomk")
#: aten ops that read a device value on the host, or whose output size depends on one: the
#: ones this route must never run in a step (its tests and ``scripts/gpu-check`` count them)
HOST_SYNCING_OPS = (
    "aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::_unique2",
    "aten::unique_consecutive", "aten::repeat_interleave",
)  # fmt: skip
#: the collectives this route runs itself, with equal-size primitives only
COLLECTIVES: Dict[str, type] = {"allgather": AllgatherCollective, "shared_topk": SharedTopkCollective}


def supports(compressor: compressors.Compressor, collective: Collective) -> bool:
    """Whether the device route can carry this compressor over this collective."""
    return compressor.name in FIXED_BUDGET and any(type(collective) is c for c in COLLECTIVES.values())


@register_route("device")
class DeviceRoute(Route):
    """Fixed-size messages, flags inside them, no host read of a device value."""

    sync_free = True

    def __init__(self) -> None:
        #: buckets reduced on this route (shared_topk's leader is round mod P)
        self.rounds = 0
        self.pending: List[fixed.FlagCopy] = []

    def __getstate__(self) -> Dict[str, Any]:
        return {"rounds": self.rounds, "pending": []}  # flags in flight (CUDA events) stay here

    def check(self, compressor: compressors.Compressor) -> None:
        if compressor.name not in FIXED_BUDGET:
            raise ValueError(
                f"Expected a fixed-budget compressor ({', '.join(FIXED_BUDGET)}) on the sync-free device route "
                f"(`sync_free=True`), but got {compressor.name!r}, whose count varies with the data; "
                "use `sync_free=False` for it."
            )

    # Stages -----------------------------------------------------------------------------

    def begin(self, state: SparseHookState, step: BucketStep) -> None:
        act_on_flags(self.pending, state)
        step.leader = self.rounds % state.backend.size
        self.rounds += 1

    def compensate(self, state: SparseHookState, step: BucketStep) -> None:
        if not step.region.numel():
            return
        if state.options.error_feedback:
            step.held = self.idle_parameters(step)
        step.scale = state.grad_scale() if state.grad_scaler is not None else 1.0
        if state.options.error_feedback and step.active is None and self._compensate_fused(state, step):
            return
        if state.options.error_feedback:
            step.velocity = state.feedback.compensate(step.plan.layout, step.region, step.scale)
        if step.active is not None:
            assert step.plan.masks.flat is not None
            step.region.mul_(step.plan.masks.flat)
            step.values = step.region.index_select(0, step.active)

    def _compensate_fused(self, state: SparseHookState, step: BucketStep) -> bool:
        """Compensation, magnitudes and the non-finite flag in one Triton pass (CUDA, or CPU
        under Triton's interpreter); False when it does not apply."""
        context, region = step.plan.context, step.region
        magnitudes = reusable(context, "device_magnitudes", region.numel(), region)
        flag = reusable(context, "device_flag", 1, region, torch.int32)
        done = fused.compensate_on_device(state.feedback, step.plan.layout, region, magnitudes, flag, step.scale)
        if done is None:
            return False
        step.velocity, step.magnitudes, step.flag = done[0], magnitudes, flag
        return True

    def _k(self, step: BucketStep) -> int:
        if step.decision.budget is None:
            raise RuntimeError("the device route needs a density budget (a fixed-budget compressor)")
        return min(step.decision.budget, step.values.numel())

    def select(self, state: SparseHookState, step: BucketStep) -> None:
        values, numel = step.values, step.values.numel()
        if not numel:
            return
        shared = isinstance(state.collective, SharedTopkCollective)
        if shared and step.leader != state.backend.rank:
            return  # the leader's indices arrive in communicate
        k, compressor = self._k(step), step.decision.compressor
        if compressor.name == "randomk":
            indices = stratified_indices(compressor, step, numel, k, state.step)
        else:  # topk, sampled_topk: the exact top-k (NaN and inf rank first, so they are seen)
            magnitudes = step.magnitudes if step.magnitudes is not None else values.abs()
            if step.held is not None and step.active is None:  # idle parameters rank last
                for held, (start, end) in zip(step.held, _spans(step)):
                    magnitudes[start:end].masked_fill_(held, 0.0)
            indices = torch.topk(magnitudes, k, sorted=False).indices
        sent = without_idle(step, indices, values.index_select(0, indices))
        step.payload = SparsePayload(indices.to(index_dtype_for(numel)), sent, numel)

    def idle_parameters(self, step: BucketStep) -> torch.Tensor:
        """Per compressed parameter, whether its gradient is all zeros (it received none;
        NaN counts as nonzero), as device bools, read before compensation (one read pass)."""
        region = step.region
        return torch.stack([region[start:end].ne(0).any() for start, end in _spans(step)]).logical_not_()

    def _flag(self, state: SparseHookState, step: BucketStep, values: torch.Tensor) -> torch.Tensor:
        """This rank's flag word, on the device: failed, or non-finite. A rank that took its
        own top-k checks only what it sends (NaN and inf rank first, so any would be there);
        a random choice, or the leader's indices, could miss one: that rank checks it all."""
        if step.failure is not None:
            return torch.full((), fixed.FAILED, dtype=torch.int64, device=values.device)
        if step.flag is not None:  # the fused pass saw every value
            return step.flag[0].to(torch.int64) * fixed.NONFINITE
        own_topk = step.decision.compressor.name != "randomk" and (
            not isinstance(state.collective, SharedTopkCollective) or step.leader == state.backend.rank
        )
        seen = values if own_topk else step.values
        return (~torch.isfinite(seen).all()).to(torch.int64) * fixed.NONFINITE

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        backend, values, context = state.backend, step.values, step.plan.context
        numel, dtype, device = values.numel(), values.dtype, values.device
        k = self._k(step) if numel else 0
        index_dtype = index_dtype_for(numel)
        failed = step.failure is not None
        if isinstance(state.collective, SharedTopkCollective):
            assert step.leader is not None
            indices = reusable(context, "device_shared_indices", k, values, index_dtype)
            if step.leader == backend.rank:
                if not failed and step.payload.count == k:
                    indices.copy_(step.payload.indices)
                else:
                    indices.zero_()
            fixed.broadcast_indices(backend, indices, step.leader)
            if failed:
                sent = torch.zeros(k, dtype=dtype, device=device)
            else:
                sent = without_idle(step, indices, values.index_select(0, indices.long()))
            step.payload = SparsePayload(indices, sent, numel)
            return fixed.gather_fixed(backend, sent, None, self._flag(state, step, sent), numel, context)
        if failed or step.payload.count != k:  # still send k entries: nobody waits for a missing message
            zeros = torch.zeros(k, dtype=index_dtype, device=device)
            step.payload = SparsePayload(zeros, torch.zeros(k, dtype=dtype, device=device), numel)
        payload = step.payload
        flag = self._flag(state, step, payload.values)
        return fixed.gather_fixed(backend, payload.values, payload.indices, flag, numel, context)

    def commit(self, state: SparseHookState, step: BucketStep, summed: Any) -> bool:
        gathered: fixed.Gathered = summed
        self.pending.append(fixed.FlagCopy(gathered.flags, state.step))
        if state.options.error_feedback and step.region.numel():
            compensated = step.values if step.active is None else step.region
            payload = step.payload
            indices = payload.indices if step.active is None else step.active.index_select(0, payload.indices.long())
            sent = SparsePayload(indices, payload.values, step.region.numel())
            state.feedback.update(step.plan.layout, compensated, sent, step.scale, step.velocity, unless=gathered.bad)
        state.counters.selected += step.payload.count
        return True  # counted when the flags reach the host (poll)

    def decode(self, state: SparseHookState, step: BucketStep, summed: Any) -> torch.Tensor:
        gathered: fixed.Gathered = summed
        out = step.region if step.active is None else torch.empty_like(step.values)
        if out.numel():
            shared = step.payload.indices if not gathered.indices else None
            gathered.write(out, 1.0 / state.backend.size, shared=shared)
        if step.failure is not None:  # every message has gone out: now raise this rank's own error
            raise step.failure
        act_on_flags(self.pending, state)  # on CPU this bucket's flags: a failed peer raises on every rank now
        return out


def without_idle(step: BucketStep, indices: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """``sent`` (the values at ``indices`` of ``step.values``) with the entries of the
    parameters ``step.held`` flags set to zero, on the device."""
    if step.held is None or not indices.numel():
        return sent
    positions = indices.long() if step.active is None else step.active.index_select(0, indices.long())
    owners = torch.bucketize(positions, _ends(step), right=True)
    return sent.masked_fill(step.held.index_select(0, owners), 0.0)


def _spans(step: BucketStep) -> List[Tuple[int, int]]:
    """Each compressed parameter's (start, end) in the bucket's region, once per layout."""
    spans: Optional[List[Tuple[int, int]]] = step.plan.context.get("device_spans")
    if spans is None:
        ends = list(itertools.accumulate(n for _, n in step.plan.layout))
        spans = step.plan.context["device_spans"] = list(zip([0, *ends[:-1]], ends))
    return spans


def _ends(step: BucketStep) -> torch.Tensor:
    """The spans' ends as a device tensor (for ``torch.bucketize``), once per layout."""
    key = f"device_span_ends:{step.region.device}"
    ends: Optional[torch.Tensor] = step.plan.context.get(key)
    if ends is None:
        ends = torch.tensor([end for _, end in _spans(step)], dtype=torch.int64, device=step.region.device)
        step.plan.context[key] = ends
    return ends


def act_on_flags(pending: List[fixed.FlagCopy], state: SparseHookState) -> None:
    """Act on every flag copy in ``pending`` that has reached the host: count the non-finite
    buckets; raise when a rank failed or sent a message for another bucket layout (the sums
    are then NaN on every rank)."""
    while pending and pending[0].ready():
        flags = pending.pop(0)
        words = flags.read()
        state.counters.nonfinite_buckets += int(any(w & fixed.NONFINITE for w in words))
        if any(w & bit for w in words for bit, _ in fixed.FATAL):
            pending.clear()
            fixed.check_words(words, f" at step {flags.step} (sync-free route)")


def stratified_indices(
    compressor: compressors.Compressor, step: BucketStep, numel: int, k: int, at: int
) -> torch.Tensor:
    """k distinct coordinates, one drawn uniformly in each of k equal strata, from a
    device generator seeded by (seed, step, bucket): the same on every rank, every
    coordinate chosen with probability about k / numel, no host read."""
    seed = int(getattr(compressor, "seed", 0))
    gen = torch.Generator(device=step.values.device).manual_seed(zlib.crc32(f"{seed}:{at}:{step.plan.key}".encode()))
    starts = torch.arange(k, device=step.values.device, dtype=torch.int64) * numel // k
    widths = (torch.arange(1, k + 1, device=step.values.device, dtype=torch.int64) * numel // k) - starts
    offsets = (torch.rand(k, generator=gen, device=step.values.device, dtype=torch.float64) * widths).long()
    return starts + offsets
