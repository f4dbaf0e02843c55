"""The sparse route: every rank selects from its compensated gradient, the collective sums
the payloads, and error feedback keeps what was not sent.

On CPU with numba, compensation is one compiled pass over the region (the scan, the
residual added, and the entries above the compressor's candidate floor gathered), so that
selection reads only those candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gradsparse.comm import Reduced
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
        if step.region.numel() and self._compensate_fused(state, step):
            return
        super().compensate(state, step)

    def _compensate_fused(self, state: SparseHookState, step: BucketStep) -> bool:
        """The compensation in one compiled pass (CPU, numba). False when it does not
        apply (masks, no error feedback, a compressor with per-coordinate state, momentum,
        no numba, another device): then nothing was done."""
        plan, compressor, feedback = step.plan, step.decision.compressor, state.feedback
        if step.active is not None or not state.options.error_feedback or state.compressor.state_buffers:
            return False
        if not fused.can_fuse(feedback, step.region):
            return False
        scale = state.grad_scale()

        def values_at(positions: torch.Tensor) -> torch.Tensor:
            return fused.compensated_at(feedback, plan.layout, step.region, positions, scale)

        floor = None
        if self.selects(state, step):
            floor = state.selection.candidate_floor(compressor, plan.key, plan.layout, step.region, values_at)
        scan = fused.compensate_scan(feedback, plan.layout, step.region, scale, floor, plan.scratch)
        if scan is None:
            return False
        step.idle, step.values, step.in_spare, step.scale = scan.idle, scan.compensated, scan.in_spare, scale
        if not scan.finite or not plan.scan(step.buffer, check_finite=True, compressed=False)[0]:
            step.nonfinite = True
        else:
            step.candidates = scan.candidates
        return True

    def select(self, state: SparseHookState, step: BucketStep) -> None:
        if step.nonfinite or not step.region.numel() or not self.selects(state, step):
            return
        plan = step.plan
        layout = plan.layout if step.active is None else plan.masks.layout
        step.payload = state.selection.compress(
            step.decision.compressor, plan.key, layout, step.values, state.step, large=step.candidates
        )

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        return state.collective.reduce(
            step.payload, state.backend, context=step.plan.context, nonfinite=step.nonfinite,
            failed=step.failure is not None,
        )  # fmt: skip

    def commit(self, state: SparseHookState, step: BucketStep, summed: Any) -> bool:
        reduced: Reduced = summed
        state.policy.learn(step.plan.key, reduced.counts)
        # Commit only now: if any rank overflowed, AMP skips this step everywhere, so the
        # residual must stay as it was. A lossy collective reports which entries made it.
        payload, region = step.payload, step.region
        kept = reduced.kept if reduced.kept is not None and payload.count else None
        indices = payload.indices if kept is None else payload.indices[kept]
        values = payload.values if kept is None else payload.values[kept]
        if step.active is not None:  # back from active coordinates to the region
            indices = step.active[indices.long()].to(payload.indices.dtype)
        finite = not reduced.nonfinite
        if finite and state.options.error_feedback and region.numel():
            sent = SparsePayload(indices, values, region.numel())
            compensated = step.values if step.active is None else region
            state.feedback.update(
                step.plan.layout, compensated, sent, step.scale, step.velocity, keep=step.idle, swap=step.in_spare
            )
        state.counters.selected += int(indices.numel())
        return finite

    def decode(self, state: SparseHookState, step: BucketStep, summed: Any) -> torch.Tensor:
        reduced: Reduced = summed
        out = step.region if step.active is None else torch.empty_like(step.values)
        return reduced.write(out, scale=1.0 / state.backend.size)  # averaged as it is added
