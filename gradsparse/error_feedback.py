"""Error feedback: what a worker does not send is kept and added to its next gradient.

State is keyed by parameter name, never by DDP bucket index, so it survives DDP's
bucket rebuild after the first iteration, ``no_sync()`` accumulation and
``find_unused_parameters``. For speed, the tensors of the parameters that are selected
together (one bucket, or one layer) are views into one flat buffer, so compensation is
a single add; when DDP regroups parameters the buffer is rebuilt by copying.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional, Tuple

import torch

from gradsparse import kernels
from gradsparse.checks import check_probability
from gradsparse.payload import SparsePayload
from gradsparse.store import Layout, ParamStore

__all__ = ["ErrorFeedback"]


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

    def compensate_scan(
        self,
        layout: Layout,
        grad: torch.Tensor,
        scale: float = 1.0,
        floor: Optional[float] = None,
        scratch: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Optional[Tuple[bool, Tuple[str, ...], Optional[torch.Tensor]]]:
        """:meth:`compensate` fused with the scan of the gradient, in one compiled pass (see
        :func:`gradsparse.kernels.compensate_scan`): ``(finite, idle, large)``. ``idle``
        names the parameters whose gradient was all zeros; they are treated as ``keep`` in
        :meth:`compensate` (their entries come out zero). ``large`` holds the ascending
        indices where the compensated magnitude reaches ``floor`` (None without a floor).
        Without momentum only; None when the kernel does not apply, and nothing was done.
        Non-finite: ``grad`` holds garbage and the state is untouched."""
        if self.momentum or not kernels.supports(grad):
            return None
        residual = None
        if not self.is_zero(layout):
            self._rescale(layout, grad, scale)
            residual = self.residuals.flat(layout, grad)
        found = kernels.compensate_scan(grad, residual, [n for _, n in layout], floor, scratch or {})
        if found is None:
            return None
        idle = tuple(name for (name, n), used in zip(layout, found.nonzero) if n and not used)
        large = found.large
        for start, end in _spans(layout, idle):
            grad[start:end] = 0  # exactly the zeros it held, where no residual was added
            if large is not None:
                large = large[(large < start) | (large >= end)]
        return found.finite, idle, large

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
    ) -> None:
        """Keep what ``payload`` did not send. ``compensated`` must still hold the values
        that :meth:`compensate` produced, and ``new_velocity`` what it returned."""
        held = self._held(layout, compensated, keep)
        self._zero.difference_update(name for name, _ in layout)
        residual = self.residuals.flat(layout, compensated)
        residual.copy_(compensated)
        sent = payload.indices
        residual[sent] = 0
        if self.momentum:
            if new_velocity is None:
                raise ValueError("momentum correction needs the `new_velocity` that compensate() returned")
            velocity = self.velocity.flat(layout, compensated)
            velocity.copy_(new_velocity)
            velocity[sent] = 0
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

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.residuals.load_state_dict(state.get("residuals", {}))
        self.velocity.load_state_dict(state.get("velocity", {}))
        self.scales = {name: float(v) for name, v in state.get("scales", {}).items()}
        self._zero.clear()

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
