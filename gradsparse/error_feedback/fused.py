"""The compensation fused with the scan of the gradient, in one compiled pass (CPU, numba;
see :func:`gradsparse.kernels.compensate_scan`), and what it hands on.

The compensated tensor is written into the residual memory's spare buffer, which
:meth:`ErrorFeedback.update` (``swap=True``) makes the residual by swapping, so that
keeping what was not sent costs no copy and a skipped step leaves the state exactly as it
was. The gradient is only read, or zeroed as it is read when the caller will scatter the
sum into it (``clear``). The pass also gathers the entries above the compressor's
candidate floor, so that selection reads only those."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Dict, Optional, Sequence, Tuple

import torch

from gradsparse import kernels, triton_kernels
from gradsparse.payload import Candidates
from gradsparse.store import Layout, spans

if TYPE_CHECKING:
    from . import ErrorFeedback

__all__ = ["ScanResult", "can_fuse", "compensate_on_device", "compensate_scan", "compensated_at", "update_unless"]


@dataclass(frozen=True)
class ScanResult:
    """What :func:`compensate_scan` made of a gradient in its one pass."""

    finite: bool
    idle: Tuple[str, ...]  # parameters whose gradient was all zeros: their state is kept
    candidates: Optional[Candidates]  # every entry at or above the floor it was given
    compensated: torch.Tensor
    #: ``compensated`` lies in the spare residual buffer: :meth:`ErrorFeedback.update`
    #: makes it the residual by swapping (pass ``swap=True``)
    in_spare: bool
    #: the pass zeroed the gradient as it read it (asked with ``clear``, done when
    #: ``compensated`` lies apart from it, in the spare buffer)
    cleared: bool = False


def can_fuse(feedback: ErrorFeedback, grad: torch.Tensor) -> bool:
    """Whether :func:`compensate_scan` applies to ``grad`` (no momentum; a contiguous
    float32/float64 CPU tensor with numba installed)."""
    return feedback.correction is None and kernels.supports(grad)


def compensated_at(
    feedback: ErrorFeedback,
    layout: Layout,
    grad: torch.Tensor,
    positions: torch.Tensor,
    scale: float = 1.0,
    *,
    in_grad: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """What compensation would make of ``grad`` at ``positions``, without compensating
    (without momentum: the gradient plus the residual there). ``in_grad``: the same
    positions in ``grad`` when it is not laid out as ``layout`` (a bucket)."""
    if feedback.correction is not None:
        raise ValueError("compensated_at() is for error feedback without momentum")
    values = torch.index_select(grad, 0, positions if in_grad is None else in_grad)
    if not feedback.is_zero(layout):
        feedback.loss_scales.rescale(layout, feedback.stores(), grad, scale)
        values.add_(torch.index_select(feedback.memory.flat(layout, grad), 0, positions))
    return values


def compensate_scan(
    feedback: ErrorFeedback,
    layout: Layout,
    grad: torch.Tensor,
    scale: float = 1.0,
    floor: Optional[float] = None,
    scratch: Optional[Dict[str, torch.Tensor]] = None,
    *,
    pieces: Optional[Sequence[torch.Tensor]] = None,
    clear: bool = False,
) -> Optional[ScanResult]:
    """:meth:`ErrorFeedback.compensate` fused with the scan of ``grad``. ``idle`` names the
    parameters whose gradient was all zeros: their entries come out zero and their state
    is kept. ``candidates`` holds the ascending indices where the compensated magnitude
    reaches ``floor`` (None without a floor). (With no residual yet, ``compensated`` is
    ``grad`` itself.) ``pieces``: the gradient as one tensor per parameter of ``layout``,
    wherever they lie (``grad`` then only gives the dtype and device); this needs a
    residual. ``clear``: zero the gradient (or its pieces) as it is read, where
    ``compensated`` lies apart from it (a residual is kept; ``ScanResult.cleared`` says
    whether it was done): a sum can then be scattered into it without a fill. Without
    ``clear`` the gradient is only read. None when the kernel does not apply
    (:func:`can_fuse`, or ``pieces`` without a residual): nothing was done."""
    if not can_fuse(feedback, grad) or (pieces is not None and feedback.is_zero(layout)):
        return None
    residual = into = None
    if not feedback.is_zero(layout):
        feedback.loss_scales.rescale(layout, feedback.stores(), grad, scale)
        residual = feedback.memory.flat(layout, grad)
        into = feedback.memory.spare(layout, residual)
    source = grad if pieces is None else pieces
    cleared = clear and into is not None
    sizes = [n for _, n in layout]
    found = kernels.compensate_scan(source, residual, sizes, floor, scratch or {}, into=into, clear=cleared)
    if found is None:
        return None
    compensated = grad if into is None else into
    idle = tuple(name for (name, n), used in zip(layout, found.nonzero) if n and not used)
    large = found.large
    for start, end in spans(layout, idle):
        if into is not None:  # the gradient holds zeros there already
            compensated[start:end] = 0  # nothing of theirs is sent
        if large is not None:
            large = large[(large < start) | (large >= end)]
    candidates = None if large is None or floor is None else Candidates(floor, large)
    return ScanResult(found.finite, idle, candidates, compensated, in_spare=into is not None, cleared=cleared)


def compensate_on_device(
    feedback: ErrorFeedback,
    layout: Layout,
    grad: torch.Tensor,
    magnitude: torch.Tensor,
    flag: torch.Tensor,
    scale: float = 1.0,
) -> Optional[Tuple[Optional[torch.Tensor]]]:
    """:meth:`ErrorFeedback.compensate` as one Triton pass
    (:func:`gradsparse.triton_kernels.compensate`), which also writes ``|compensated|``
    into ``magnitude`` and raises the int32 ``flag[0]`` on a non-finite value, on the
    device. Returns ``(new_velocity,)`` as :meth:`ErrorFeedback.compensate` returns it, or
    None when the kernel does not apply (no Triton, not CUDA float32): nothing was done."""
    if not triton_kernels.usable(grad):
        return None
    feedback.loss_scales.rescale(layout, feedback.stores(), grad, scale)
    residual = None if feedback.memory.is_zero(layout) else feedback.memory.flat(layout, grad)
    velocity = new_velocity = None
    if feedback.correction is not None:
        velocity = feedback.correction.velocity.flat(layout, grad)
        new_velocity = torch.empty_like(grad)
    flag.zero_()
    triton_kernels.compensate(grad, residual, magnitude, flag, velocity, new_velocity, feedback.momentum)
    return (new_velocity,)


def update_unless(
    feedback: ErrorFeedback,
    layout: Layout,
    compensated: torch.Tensor,
    sent: torch.Tensor,
    new_velocity: Optional[torch.Tensor],
    unless: torch.Tensor,
    *,
    swap: bool = False,
    keep: Collection[str] = (),
) -> None:
    """:meth:`ErrorFeedback.update` (``unless=``): the update, or none when the device flag
    ``unless`` is set, selected by ``torch.where`` on the device (one pass per state
    tensor), so that no host read decides it."""
    if swap or keep:
        raise ValueError("update(unless=...) takes neither `swap` nor `keep`")
    targets = [(feedback.memory.flat(layout, compensated), compensated)]
    if feedback.correction is not None:
        if new_velocity is None:
            raise ValueError("momentum correction needs the `new_velocity` that compensate() returned")
        targets.append((feedback.correction.velocity.flat(layout, new_velocity), new_velocity))
    for state, new in targets:
        torch.where(unless, state, new, out=state)
        at_sent = state.index_select(0, sent)
        state.index_copy_(0, sent, torch.where(unless, at_sent, torch.zeros_like(at_sent)))
