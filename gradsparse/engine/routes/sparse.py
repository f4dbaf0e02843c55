"""The sparse route: every rank selects from its compensated gradient, the collective sums
the payloads, and error feedback keeps what was not sent.

On CPU with numba, compensation is one compiled pass over the region (the scan, the
residual added, and the entries above the compressor's candidate floor gathered), so that
selection reads only those candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from gradsparse import kernels
from gradsparse.comm import Message, Reduced
from gradsparse.error_feedback import fused
from gradsparse.payload import SparsePayload

from .route import BucketStep, Route, register_route

if TYPE_CHECKING:
    from ..state import SparseHookState

__all__ = ["SparseRoute"]


@register_route("sparse")
class SparseRoute(Route):
    """Select on every rank, sum the payloads, keep the rest."""

    def selects(self, state: SparseHookState, step: BucketStep) -> bool:
        """Whether this rank selects for the bucket (every rank, on this route)."""
        return True

    def compensate(self, state: SparseHookState, step: BucketStep) -> None:
        if step.plan.numel and self._compensate_fused(state, step):
            return
        super().compensate(state, step)

    def _compensate_fused(self, state: SparseHookState, step: BucketStep) -> bool:
        """The compensation in one compiled pass (CPU, numba). False when it does not
        apply (masks, no error feedback, a compressor with per-coordinate state, momentum,
        no numba, another device): then nothing was done.

        Where the compressed parameters do not lie contiguous in the bucket (biases and
        norms between them) and a residual is kept, the pass reads each parameter where it
        lies, and the decode writes the averages there (``step.in_bucket``): the region is
        never gathered out of the bucket nor scattered back. Where the pass reads the
        bucket itself (in place, or a region that is a view of it) and writes the
        compensated values apart, into the spare buffer, it zeroes the gradients as it
        reads them (``step.cleared``): nothing reads them after the pass, and the decode
        then scatters the sum into them without filling the bucket first."""
        plan, compressor, feedback = step.plan, step.decision.compressor, state.feedback
        if step.active is not None or not state.options.error_feedback or state.compressor.state_buffers:
            return False
        if not fused.can_fuse(feedback, step.buffer):
            return False
        in_bucket = plan.region_start is None and not feedback.is_zero(plan.layout)
        grad = step.buffer if in_bucket else step.region
        scale = state.grad_scale()

        def values_at(positions: torch.Tensor) -> torch.Tensor:
            at = plan.in_bucket(positions) if in_bucket else None
            return fused.compensated_at(feedback, plan.layout, grad, positions, scale, in_grad=at)

        floor = None
        if self.selects(state, step):
            like = step.buffer[: plan.numel] if in_bucket else grad
            floor = state.selection.candidate_floor(compressor, plan.key, plan.layout, like, values_at)
        pieces = plan.pieces(step.buffer) if in_bucket else None
        in_place = in_bucket or plan.region_start is not None  # the pass reads the bucket, not a copy
        scan = fused.compensate_scan(
            feedback, plan.layout, grad, scale, floor, plan.scratch, pieces=pieces, clear=in_place
        )  # fmt: skip
        if scan is None:
            return False
        step.idle, step.values, step.in_spare, step.scale = scan.idle, scan.compensated, scan.in_spare, scale
        step.in_bucket, step.cleared = in_bucket, scan.cleared
        if not scan.finite or not plan.scan(step.buffer, check_finite=True, compressed=False)[0]:
            step.nonfinite = True
        else:
            step.candidates = scan.candidates
        return True

    def select(self, state: SparseHookState, step: BucketStep) -> None:
        if step.nonfinite or not step.plan.numel or not self.selects(state, step):
            return
        plan = step.plan
        layout = plan.layout if step.active is None else plan.masks.layout
        step.payload = state.selection.compress(
            step.decision.compressor, plan.key, layout, step.values, state.step, large=step.candidates
        )

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        return state.collective.reduce(
            step.payload, state.backend, context=step.plan.context, nonfinite=step.nonfinite,
            failed=step.failure is not None, count=self.known_count(state, step),
        )  # fmt: skip

    def known_count(self, state: SparseHookState, step: BucketStep) -> Optional[int]:
        """How many entries every rank sends for this bucket, when every rank knows it
        without asking (a compressor with an exact budget): the collective may then skip
        its header exchange. The same on every rank."""
        plan, numel = step.plan, step.decision.work_numel
        if not numel or not self.selects(state, step):
            return None
        layout = plan.layout if step.active is None else plan.masks.layout
        return state.selection.exact_count(step.decision.compressor, layout, numel)

    def commit(self, state: SparseHookState, step: BucketStep, summed: Any) -> bool:
        reduced: Reduced = summed
        state.policy.learn(step.plan.key, reduced.counts)
        # Commit only now: if any rank overflowed, AMP skips this step everywhere, so the
        # residual must stay as it was. A lossy collective reports which entries made it.
        payload, numel = step.payload, step.plan.numel
        kept = reduced.kept if reduced.kept is not None and payload.count else None
        indices = payload.indices if kept is None else payload.indices[kept]
        values = payload.values if kept is None else payload.values[kept]
        if step.active is not None:  # back from active coordinates to the region
            indices = step.active[indices.long()].to(payload.indices.dtype)
        finite = not reduced.nonfinite
        if finite and state.options.error_feedback and numel:
            sent = SparsePayload(indices, values, numel)
            compensated = step.values if step.active is None else step.region
            state.feedback.update(
                step.plan.layout, compensated, sent, step.scale, step.velocity, keep=step.idle, swap=step.in_spare
            )
        state.counters.selected += int(indices.numel())
        return finite

    def decode(self, state: SparseHookState, step: BucketStep, summed: Any) -> Optional[torch.Tensor]:
        reduced: Reduced = summed
        scale = 1.0 / state.backend.size  # averaged as it is added
        if step.in_bucket and all(part.sparse is not None for part in reduced.parts):
            _write_in_bucket(step, reduced, scale)
            return None
        out = step.region if step.active is None else torch.empty_like(step.values)
        # zeroed by the pass only where the region is a view of the bucket (a gathered copy may predate it)
        zeroed = step.cleared and step.plan.region_start is not None
        return reduced.write(out, scale=scale, zeroed=zeroed)


def _write_in_bucket(step: BucketStep, reduced: Reduced, scale: float) -> None:
    """The sum at the compressed parameters' own entries of the bucket, zeros elsewhere
    among them; the parameters sent dense (all NaN when the sum is) are written over after
    this. With numba, region positions are mapped to the bucket as they are added."""
    plan, numel = step.plan, step.buffer.numel()
    lists = [(part.sparse.indices, part.sparse.values) for part in reduced.parts if part.sparse is not None]
    where = plan.region_map(step.buffer.device)
    if not reduced.nonfinite and kernels.scatter_sum(step.buffer, lists, scale, zeroed=step.cleared, segments=where):
        return
    parts = [Message(0, sparse=SparsePayload(plan.in_bucket(i), v, numel)) for i, v in lists]
    Reduced(numel, parts=parts, nonfinite=reduced.nonfinite).write(step.buffer, scale=scale, zeroed=step.cleared)
