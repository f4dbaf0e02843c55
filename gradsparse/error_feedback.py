"""Error feedback: what a worker does not send is kept and added to its next gradient.

State is keyed by parameter name, never by DDP bucket index, so it survives DDP's
bucket rebuild after the first iteration, ``no_sync()`` accumulation and
``find_unused_parameters``. For speed, the tensors of the parameters that are selected
together (one bucket, or one layer) are views into one flat buffer, so compensation is
a single add; when DDP regroups parameters the buffer is rebuilt by copying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Tuple

import torch

from gradsparse import kernels
from gradsparse.checks import check_probability
from gradsparse.payload import Candidates, SparsePayload
from gradsparse.store import Layout, ParamStore

__all__ = ["ErrorFeedback", "ScanResult"]


@dataclass(frozen=True)
class ScanResult:
    """What :meth:`ErrorFeedback.compensate_scan` made of a gradient in its one pass."""

    finite: bool
    idle: Tuple[str, ...]  # parameters whose gradient was all zeros: their state is kept
    candidates: Optional[Candidates]  # every entry at or above the floor it was given
    compensated: torch.Tensor
    #: ``compensated`` lies in the spare residual buffer: :meth:`ErrorFeedback.update`
    #: makes it the residual by swapping (pass ``swap=True``)
    in_spare: bool


class ErrorFeedback:
    """Residual memory, optionally with DGC momentum correction.

    Without momentum: ``compensated = grad + residual``; after selection
    ``residual = compensated - sent``.

    With ``momentum=m`` (Lin et al., DGC): ``u = m * u + grad``,
    ``compensated = residual + u``; after selection the sent coordinates are cleared in
    both ``residual`` and ``u`` (momentum factor masking). Use a momentum-free optimizer
    then: the momentum is applied here, before compression.

    Conservation holds exactly: the sent values are copies of the compensated values at
    the selected indices, and the residual is the compensated tensor with those indices
    set to zero.

    With AMP the gradients arrive multiplied by the loss scale. State is kept in the
    scale it was made in and rescaled (exactly: scales are powers of two) when the
    scale changes, so it stays in the gradient's own range even in fp16.
    """

    def __init__(self, momentum: float = 0.0) -> None:
        self.momentum = check_probability("momentum", momentum)
        self.residuals = ParamStore()
        self.velocity = ParamStore()
        #: loss scale each parameter's state is expressed in (1.0 without AMP)
        self.scales: Dict[str, float] = {}
        #: parameters whose residual is known to be all zeros (everything was sent dense)
        self._zero: set = set()
        #: per layout, the second residual buffer that compensate_scan writes into
        self._spares: Dict[Layout, torch.Tensor] = {}

    def is_zero(self, layout: Layout) -> bool:
        """Whether the residual of ``layout`` is known to be zero (compensation is a no-op):
        everything was sent dense, or nothing was ever kept for these parameters."""
        stored = self.residuals.tensors
        return not self.momentum and all(name in self._zero or name not in stored for name, _ in layout)

    def _rescale(self, layout: Layout, like: torch.Tensor, scale: float) -> None:
        """Express the state of ``layout`` in the current loss scale. GradScaler moves the
        scale by powers of two, so this multiplication is exact."""
        stale = [(name, self.scales[name]) for name, _ in layout if self.scales.get(name, scale) != scale]
        if not stale:
            return
        stores = [self.residuals] + ([self.velocity] if self.momentum else [])
        for store in stores:
            store.flat(layout, like)
            for name, old in stale:
                store.tensors[name].mul_(scale / old)
        for name, _ in stale:
            self.scales[name] = scale

    def compensate(
        self, layout: Layout, grad: torch.Tensor, scale: float = 1.0, keep: Collection[str] = ()
    ) -> Optional[torch.Tensor]:
        """Turn ``grad`` (flat, laid out as ``layout``) into the compensated tensor in place.

        Nothing is committed yet: :meth:`update` does that once the step is known to be
        good, so a step that AMP skips leaves the state as it was. Returns the new
        momentum (with momentum correction) for :meth:`update`, else None. ``scale`` is
        the current loss scale when gradients are scaled (AMP). Parameters named in
        ``keep`` received no gradient this step: their entries come out zero (nothing of
        theirs is sent) and :meth:`update` and :meth:`clear` leave their state as it is."""
        if self.is_zero(layout):
            return None
        self._rescale(layout, grad, scale)
        new_velocity = None
        if self.momentum:
            grad.add_(self.velocity.flat(layout, grad), alpha=self.momentum)
            new_velocity = grad.clone()
        grad.add_(self.residuals.flat(layout, grad))
        for start, end in _spans(layout, keep):
            grad[start:end] = 0
        return new_velocity

    def can_fuse(self, grad: torch.Tensor) -> bool:
        """Whether :meth:`compensate_scan` applies to ``grad`` (no momentum; a contiguous
        float32/float64 CPU tensor with numba installed)."""
        return not self.momentum and kernels.supports(grad)

    def compensated_at(
        self, layout: Layout, grad: torch.Tensor, positions: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        """What :meth:`compensate` would make of ``grad`` at ``positions``, without
        compensating (without momentum: the gradient plus the residual there)."""
        if self.momentum:
            raise ValueError("compensated_at() is for error feedback without momentum")
        values = torch.index_select(grad, 0, positions)
        if not self.is_zero(layout):
            self._rescale(layout, grad, scale)
            values.add_(torch.index_select(self.residuals.flat(layout, grad), 0, positions))
        return values

    def compensate_scan(
        self,
        layout: Layout,
        grad: torch.Tensor,
        scale: float = 1.0,
        floor: Optional[float] = None,
        scratch: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Optional[ScanResult]:
        """:meth:`compensate` fused with the scan of the gradient, in one compiled pass (see
        :func:`gradsparse.kernels.compensate_scan`).

        ``grad`` is only read: the compensated tensor is written into a second residual
        buffer, which :meth:`update` (``swap=True``) makes the residual by swapping, so that keeping
        what was not sent costs no copy and a skipped step leaves the state exactly as it
        was. (With no residual yet, ``compensated`` is ``grad`` itself.) ``idle`` names the
        parameters whose gradient was all zeros: their entries come out zero and their
        state is kept, as with ``keep`` in :meth:`compensate`. ``candidates`` holds the
        ascending indices where the compensated magnitude reaches ``floor`` (None without a
        floor). None when the kernel does not apply (:meth:`can_fuse`): nothing was done."""
        if not self.can_fuse(grad):
            return None
        residual = into = None
        if not self.is_zero(layout):
            self._rescale(layout, grad, scale)
            residual = self.residuals.flat(layout, grad)
            into = self._spare(layout, residual)
        found = kernels.compensate_scan(grad, residual, [n for _, n in layout], floor, scratch or {}, into=into)
        if found is None:
            return None
        compensated = grad if into is None else into
        idle = tuple(name for (name, n), used in zip(layout, found.nonzero) if n and not used)
        large = found.large
        for start, end in _spans(layout, idle):
            if into is not None:  # the gradient holds zeros there already
                compensated[start:end] = 0  # nothing of theirs is sent
            if large is not None:
                large = large[(large < start) | (large >= end)]
        candidates = None if large is None or floor is None else Candidates(floor, large)
        return ScanResult(found.finite, idle, candidates, compensated, in_spare=into is not None)

    def _spare(self, layout: Layout, residual: torch.Tensor) -> torch.Tensor:
        """The second residual buffer of ``layout``. When DDP regroups parameters, the
        spares of the layouts that shared them go, as the store's flat tensors do."""
        spare = self._spares.get(layout)
        if spare is None or spare.shape != residual.shape or spare.dtype != residual.dtype:
            names = {name for name, _ in layout}
            for stale in [key for key in self._spares if key != layout and any(n in names for n, _ in key)]:
                del self._spares[stale]
            spare = self._spares[layout] = torch.empty_like(residual)
        return spare

    def _stores(self) -> List[ParamStore]:
        return [self.residuals, self.velocity] if self.momentum else [self.residuals]

    def _held(
        self, layout: Layout, like: torch.Tensor, keep: Collection[str]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(view, copy) of the kept parameters' state: writing the copy back into the view
        restores it (the flat tensor of a layout is the same until the layout changes)."""
        return [
            (view, view.clone())
            for store in self._stores()
            for a, b in _spans(layout, keep)
            for view in (store.flat(layout, like)[a:b],)
        ]

    def update(
        self,
        layout: Layout,
        compensated: torch.Tensor,
        payload: SparsePayload,
        scale: float = 1.0,
        new_velocity: Optional[torch.Tensor] = None,
        keep: Collection[str] = (),
        swap: bool = False,
    ) -> None:
        """Keep what ``payload`` did not send. ``compensated`` must still hold the values
        that :meth:`compensate` produced, and ``new_velocity`` what it returned; with
        ``swap``, it is the spare buffer that :meth:`compensate_scan` wrote
        (``ScanResult.in_spare``), which becomes the residual without a copy."""
        sent = payload.indices.long()
        if swap:
            if self.momentum or compensated is not self._spares.get(layout):
                raise ValueError("update(swap=True) takes the spare buffer that compensate_scan() wrote")
            compensated.index_fill_(0, sent, 0)
            for start, end in _spans(layout, keep):
                compensated[start:end] = self.residuals.flat(layout, compensated)[start:end]
            self._spares[layout] = self.residuals.swap(layout, compensated)
            held: List[Tuple[torch.Tensor, torch.Tensor]] = []
        else:
            held = self._held(layout, compensated, keep)
            residual = self.residuals.flat(layout, compensated)
            residual.copy_(compensated)
            residual.index_fill_(0, sent, 0)
        self._zero.difference_update(name for name, _ in layout)
        if self.momentum:
            if new_velocity is None:
                raise ValueError("momentum correction needs the `new_velocity` that compensate() returned")
            velocity = self.velocity.flat(layout, compensated)
            velocity.copy_(new_velocity)
            velocity.index_fill_(0, sent, 0)
        for view, saved in held:
            view.copy_(saved)
        for name, _ in layout:
            self.scales[name] = scale

    def clear(self, layout: Layout, like: torch.Tensor, scale: float = 1.0, keep: Collection[str] = ()) -> None:
        """Everything was sent (the bucket went dense): nothing is kept back, but for the
        parameters in ``keep``, whose state stays as it is."""
        if self.is_zero(layout):
            return
        held = self._held(layout, like, keep)
        for store in self._stores():
            store.flat(layout, like).zero_()
        for view, saved in held:
            view.copy_(saved)
        for name, _ in layout:
            self.scales[name] = scale
        if not self.momentum:
            self._zero.update(name for name, _ in layout if name not in keep)

    def state_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"residuals": self.residuals.state_dict(), "scales": dict(self.scales)}
        if self.momentum:
            out["velocity"] = self.velocity.state_dict()
        return out

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_spares"] = {}  # scratch, as big as the residuals
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.residuals.load_state_dict(state.get("residuals", {}))
        self.velocity.load_state_dict(state.get("velocity", {}))
        self.scales = {name: float(v) for name, v in state.get("scales", {}).items()}
        self._zero.clear()
        self._spares.clear()

    def residual(self, name: str) -> Optional[torch.Tensor]:
        return self.residuals.tensors.get(name)

    def names(self) -> List[str]:
        return list(self.residuals.tensors)


def _spans(layout: Layout, names: Collection[str]) -> List[Tuple[int, int]]:
    """[start, end) of each named parameter in a flat tensor laid out as ``layout``."""
    if not names:
        return []
    spans, offset = [], 0
    for name, n in layout:
        if name in names:
            spans.append((offset, offset + n))
        offset += n
    return spans
