"""The sign route: every coordinate every step, one bit each (:class:`~gradsparse.compressors.ScaledSign`).

Each rank encodes its compensated gradient as packed signs and block scales (blocks that
never straddle two parameters, made once per bucket layout), a message of a size every rank
knows, and the ranks gather the messages by an equal-size allgather; every rank decodes
them and sums them in rank order, so replicas stay bit-identical. Error feedback keeps
``compensated - decoded`` of this rank's own message, for every coordinate. A parameter
that received no gradient is sent with zero scales and keeps its residual whole.

Like the device route (which it extends) it reads no device value on the host: a
non-finite gradient shows as a non-finite scale, the flag word says so, and the sum comes
out NaN on every rank (AMP then skips the step) while error feedback keeps its state, by
``torch.where``; a failed or mismatched peer raises :class:`~gradsparse.comm.PeerError`
on every rank once the flags reach the host. The message's header carries its size and
the block size, and the first step of a layout compares (entries, block, blocks) across
ranks, so ranks that disagree stop instead of misreading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Tuple

import torch

from gradsparse import compressors
from gradsparse.comm import PeerError, fixed
from gradsparse.compressors.scaled_sign import SignBlocks
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


def _blocks(step: BucketStep) -> SignBlocks:
    """The blocks of this bucket's compressed values, none straddling two parameters (their
    active coordinates, under weight masks); made once per layout and mask version."""
    plan, compressor = step.plan, _sign_compressor(step)
    layout = plan.layout if step.active is None else plan.masks.layout
    key = (compressor.block, plan.masks.version if step.active is not None else None)
    made = plan.context.get("sign_blocks")  # (key, blocks): only the current masks' are kept
    if made is None or made[0] != key:
        made = plan.context["sign_blocks"] = (key, compressor.blocks_of([n for _, n in layout], step.region.device))
    blocks: SignBlocks = made[1]
    return blocks


@register_route("sign")
class SignRoute(DeviceRoute):
    """Packed signs and block scales from every rank, summed in rank order."""

    def check(self, compressor: compressors.Compressor) -> None:
        if not isinstance(compressor, compressors.ScaledSign):
            raise ValueError(
                f"Expected the 'sign' or 'quantize' compressor on the sign route, but got {compressor.name!r}; "
                "the sign route carries packed codes and block scales, not (index, value) pairs."
            )

    def begin(self, state: SparseHookState, step: BucketStep) -> None:
        """Once per bucket layout and mask version, before its first message: every rank's
        (entries, block, blocks), by a small blocking allgather, so that ranks whose messages
        would differ in size stop with an error instead of a transport failure. Later steps
        read nothing."""
        super().begin(state, step)
        context = step.plan.context
        agreed = (step.plan.masks.version, _sign_compressor(step).block, _sign_compressor(step).code_bits())
        if context.get("sign_agreed") == agreed:
            return
        blocks, compressor = _blocks(step), _sign_compressor(step)
        row = [blocks.numel, compressor.block, blocks.count, compressor.code_bits()]
        mine = torch.tensor(row, dtype=torch.int64, device=step.region.device)
        rows = [tuple(r) for r in state.backend.allgather_control(mine).cpu().tolist()]
        if len(set(rows)) > 1:
            raise PeerError(
                "ranks disagree on a bucket's (entries, block size, blocks, bits per entry): "
                + ", ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
                + " (their models, bucket orders, masks, compressors or `block` differ)"
            )
        context["sign_agreed"] = agreed

    def idle_parameters(self, step: BucketStep) -> torch.Tensor:
        """Per parameter of the blocks, whether it received no gradient (all zeros: not used
        by any forward on this rank, as DDP hands them over): by the blocks' sums, one read
        pass. Such a parameter is sent with a zero scale and keeps its residual whole."""
        grads = step.region if step.active is None else step.region.index_select(0, step.active)
        return _sign_compressor(step).idle_tensors(grads, _blocks(step))

    def _compensate_fused(self, state: SparseHookState, step: BucketStep) -> bool:
        return False  # the fused pass's magnitudes are top-k's; the plain compensation it is

    def select(self, state: SparseHookState, step: BucketStep) -> None:
        if step.values.numel():
            blocks = _blocks(step)
            assert blocks.numel == step.values.numel(), (blocks.numel, step.values.numel())
            step.encoded = _sign_compressor(step).encode(step.values, blocks, step.held)

    def _message(self, step: BucketStep) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's (signs, scales); zeros when it failed before encoding (every rank
        still sends a message of the agreed size: nobody waits for a missing one)."""
        if step.encoded is not None and step.failure is None:
            return step.encoded
        blocks, device = _blocks(step), step.values.device
        signs = torch.zeros(_sign_compressor(step).packed_bytes(blocks.numel), dtype=torch.uint8, device=device)
        return signs, torch.zeros(blocks.count, dtype=torch.bfloat16, device=device)

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        signs, scales = self._message(step)
        if step.failure is not None:
            flag = torch.full((), fixed.FAILED, dtype=torch.int64, device=scales.device)
        else:  # a NaN or inf anywhere makes its block's scale non-finite
            flag = (~torch.isfinite(scales).all()).to(torch.int64) * fixed.NONFINITE
        numel, compressor = step.values.numel(), _sign_compressor(step)
        block, bits = compressor.block, compressor.code_bits()
        return fixed.gather_signs(state.backend, signs, scales, flag, numel, step.plan.context, block=block, bits=bits)

    def commit(self, state: SparseHookState, step: BucketStep, summed: Any) -> bool:
        gathered: fixed.Gathered = summed
        self.pending.append(fixed.FlagCopy(gathered.flags, state.step))
        numel = step.values.numel()
        if state.options.error_feedback and step.region.numel() and step.encoded is not None:
            blocks = _blocks(step)
            own = step.decoded = _sign_compressor(step).decode(*step.encoded, numel, step.values.dtype, blocks)
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
            compressor, numel, blocks = _sign_compressor(step), out.numel(), _blocks(step)
            out.copy_(torch.where(gathered.bad, float("nan"), 0.0).to(out.dtype).expand(out.shape))
            for rank, (scales, signs) in enumerate(zip(gathered.values, gathered.indices)):  # rank order
                term = step.decoded if rank == state.backend.rank else None  # the same bytes, decoded
                if term is None:
                    term = compressor.decode(signs, scales, numel, out.dtype, blocks)
                out.add_(term, alpha=1.0 / state.backend.size)
        if step.failure is not None:  # every message has gone out: now raise this rank's own error
            raise step.failure
        act_on_flags(self.pending, state)  # on CPU this bucket's flags: a failed peer raises on every rank now
        return out
