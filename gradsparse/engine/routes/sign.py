"""The sign route: every coordinate every step, one bit each (:class:`~gradsparse.compressors.ScaledSign`).

Each rank encodes its compensated gradient as packed signs and block scales, a message of a
size every rank knows, and the ranks gather the messages by an equal-size allgather; every
rank decodes them and sums them in rank order, so replicas stay bit-identical. Error
feedback keeps ``compensated - decoded`` of this rank's own message, for every coordinate.

Like the device route (which it extends) it reads no device value on the host: a
non-finite gradient shows as a non-finite scale, the flag word says so, and the sum comes
out NaN on every rank (AMP then skips the step) while error feedback keeps its state, by
``torch.where``; a failed or mismatched peer raises :class:`~gradsparse.comm.PeerError`
on every rank once the flags reach the host. The message's header carries the tensor's
size and the block size, so ranks that disagree on either stop instead of misreading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Tuple

import torch

from gradsparse import compressors
from gradsparse.comm import PeerError, fixed
from gradsparse.error_feedback import keep_error

from .device import DeviceRoute, act_on_flags
from .route import BucketStep, register_route

if TYPE_CHECKING:
    from ..state import SparseHookState

__all__ = ["SignRoute"]


def _sign_compressor(step: BucketStep) -> compressors.ScaledSign:
    compressor = step.decision.compressor
    assert isinstance(compressor, compressors.ScaledSign)
    return compressor


@register_route("sign")
class SignRoute(DeviceRoute):
    """Packed signs and block scales from every rank, summed in rank order."""

    def check(self, compressor: compressors.Compressor) -> None:
        if not isinstance(compressor, compressors.ScaledSign):
            raise ValueError(
                f"Expected the 'sign' compressor on the sign route, but got {compressor.name!r}; "
                "the sign route carries packed signs, not (index, value) pairs."
            )

    def begin(self, state: SparseHookState, step: BucketStep) -> None:
        """Once per bucket layout, before its first message: every rank's (entries, block),
        by a small blocking allgather, so that ranks whose messages would differ in size
        stop with an error instead of a transport failure. Later steps read nothing."""
        super().begin(state, step)
        context = step.plan.context
        if "sign_agreed" in context:
            return
        block = _sign_compressor(step).block
        mine = torch.tensor([step.region.numel(), block], dtype=torch.int64, device=step.region.device)
        rows = [tuple(r) for r in state.backend.allgather_control(mine).cpu().tolist()]
        if len(set(rows)) > 1:
            raise PeerError(
                "ranks disagree on a bucket's (entries, sign block size): "
                + ", ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
                + " (their models, bucket orders or `block` differ)"
            )
        context["sign_agreed"] = True

    def _compensate_fused(self, state: SparseHookState, step: BucketStep) -> bool:
        return False  # the fused pass's magnitudes are top-k's; the plain compensation it is

    def select(self, state: SparseHookState, step: BucketStep) -> None:
        if step.values.numel():
            step.encoded = _sign_compressor(step).encode(step.values)

    def _message(self, step: BucketStep) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's (signs, scales); zeros when it failed before encoding (every rank
        still sends a message of the agreed size: nobody waits for a missing one)."""
        numel, values = step.values.numel(), step.values
        if step.encoded is not None and step.failure is None:
            return step.encoded
        blocks = _sign_compressor(step).blocks(numel)
        signs = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=values.device)
        return signs, torch.zeros(blocks, dtype=torch.bfloat16, device=values.device)

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        signs, scales = self._message(step)
        if step.failure is not None:
            flag = torch.full((), fixed.FAILED, dtype=torch.int64, device=scales.device)
        else:  # a NaN or inf anywhere makes its block's scale non-finite
            flag = (~torch.isfinite(scales).all()).to(torch.int64) * fixed.NONFINITE
        numel, block = step.values.numel(), _sign_compressor(step).block
        return fixed.gather_signs(state.backend, signs, scales, flag, numel, step.plan.context, block=block)

    def commit(self, state: SparseHookState, step: BucketStep, summed: Any) -> bool:
        gathered: fixed.Gathered = summed
        self.pending.append(fixed.FlagCopy(gathered.flags, state.step))
        numel = step.values.numel()
        if state.options.error_feedback and step.region.numel() and step.encoded is not None:
            own = step.decoded = _sign_compressor(step).decode(*step.encoded, numel, dtype=step.values.dtype)
            compensated, sent = step.values, own
            if step.active is not None:  # back from the active coordinates to the region
                compensated, sent = step.region, torch.zeros_like(step.region).index_copy_(0, step.active, own)
            keep_error(state.feedback, step.plan.layout, compensated, sent, step.scale, unless=gathered.bad)
        state.counters.selected += numel
        return True  # counted when the flags reach the host

    def decode(self, state: SparseHookState, step: BucketStep, summed: Any) -> torch.Tensor:
        gathered: fixed.Gathered = summed
        out: torch.Tensor = step.region if step.active is None else torch.empty_like(step.values)
        if out.numel():
            compressor, numel = _sign_compressor(step), out.numel()
            out.copy_(torch.where(gathered.bad, float("nan"), 0.0).to(out.dtype).expand(out.shape))
            for rank, (scales, signs) in enumerate(zip(gathered.values, gathered.indices)):  # rank order
                term = step.decoded if rank == state.backend.rank else None  # the same bytes, decoded
                if term is None:
                    term = compressor.decode(signs, scales, numel, dtype=out.dtype)
                out.add_(term, alpha=1.0 / state.backend.size)
        if step.failure is not None:  # every message has gone out: now raise this rank's own error
            raise step.failure
        act_on_flags(self.pending, state)  # on CPU this bucket's flags: a failed peer raises on every rank now
        return out
