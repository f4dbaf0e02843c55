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

from gradsparse.checks import check_probability
from gradsparse.payload import SparsePayload
from gradsparse.store import Layout, ParamStore, spans

from .fused import update_unless
from .loss_scale import LossScales
from .momentum import MomentumCorrection
from .residuals import Residuals

__all__ = ["ErrorFeedback", "LossScales", "MomentumCorrection", "Residuals", "keep_error"]


class ErrorFeedback:
    """Residual memory, optionally with DGC momentum correction, in the gradients' loss
    scale: :class:`Residuals`, :class:`MomentumCorrection` and :class:`LossScales` composed.

    Without momentum: ``compensated = grad + residual``; after selection
    ``residual = compensated - sent``. With ``momentum=m``: ``u = m * u + grad``,
    ``compensated = residual + u``; after selection the sent coordinates are cleared in
    both (momentum factor masking).

    Conservation holds exactly: the sent values are copies of the compensated values at
    the selected indices, and the residual is the compensated tensor with those indices
    set to zero.
    """

    def __init__(self, momentum: float = 0.0) -> None:
        check_probability("momentum", momentum)
        self.memory = Residuals()
        self.correction: Optional[MomentumCorrection] = MomentumCorrection(momentum) if momentum else None
        self.loss_scales = LossScales()

    @property
    def momentum(self) -> float:
        return 0.0 if self.correction is None else self.correction.momentum

    @property
    def residuals(self) -> ParamStore:
        return self.memory.store

    @property
    def velocity(self) -> ParamStore:
        if self.correction is None:
            raise AttributeError("this ErrorFeedback has no momentum correction, so no velocity")
        return self.correction.velocity

    def stores(self) -> List[ParamStore]:
        """The per-parameter state: the residuals, and the velocity with momentum."""
        return [self.memory.store] + ([self.correction.velocity] if self.correction is not None else [])

    def is_zero(self, layout: Layout) -> bool:
        """Whether the state of ``layout`` is known to be zero (compensation is a no-op):
        everything was sent dense, or nothing was ever kept for these parameters."""
        return self.correction is None and self.memory.is_zero(layout)

    def compensate(
        self, layout: Layout, grad: torch.Tensor, scale: float = 1.0, keep: Collection[str] = ()
    ) -> Optional[torch.Tensor]:
        """Turn ``grad`` (flat, laid out as ``layout``) into the compensated tensor in place.

        Nothing is committed yet: :meth:`update` does that once the step is known to be
        good, so a step that AMP skips leaves the state as it was. Returns the new
        momentum (with momentum correction) for :meth:`update`, else None. ``scale`` is
        the current loss scale when gradients are scaled (AMP). Parameters named in
        ``keep`` received no gradient this step: their entries come out zero (nothing of
        theirs is sent) and :meth:`update` and :meth:`clear` leave their state as it is.
        On CPU, :func:`gradsparse.error_feedback.fused.compensate_scan` does this in one
        compiled pass."""
        if self.is_zero(layout):
            return None
        self.loss_scales.rescale(layout, self.stores(), grad, scale)
        new_velocity = self.correction.apply(layout, grad) if self.correction is not None else None
        grad.add_(self.memory.flat(layout, grad))
        for start, end in spans(layout, keep):
            grad[start:end] = 0
        return new_velocity

    def _held(
        self, layout: Layout, like: torch.Tensor, keep: Collection[str]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(view, copy) of the kept parameters' state: writing the copy back into the view
        restores it (the flat tensor of a layout is the same until the layout changes)."""
        return [
            (view, view.clone())
            for store in self.stores()
            for a, b in spans(layout, keep)
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
        unless: Optional[torch.Tensor] = None,
    ) -> None:
        """Keep what ``payload`` did not send. ``compensated`` must still hold the values
        that :meth:`compensate` produced, and ``new_velocity`` what it returned; with
        ``swap``, it is the spare buffer that :meth:`compensate_scan` wrote
        (``ScanResult.in_spare``), which becomes the residual without a copy. ``unless``: a
        device flag that keeps the state as it was, decided without a host read."""
        sent = payload.indices.long()
        names = [name for name, _ in layout]
        held: List[Tuple[torch.Tensor, torch.Tensor]] = []
        if unless is not None:
            update_unless(self, layout, compensated, sent, new_velocity, unless, swap=swap, keep=keep)
        elif swap:
            if self.correction is not None or not self.memory.is_spare(layout, compensated):
                raise ValueError("update(swap=True) takes the spare buffer that compensate_scan() wrote")
            compensated.index_fill_(0, sent, 0)
            for start, end in spans(layout, keep):
                compensated[start:end] = self.memory.flat(layout, compensated)[start:end]
            self.memory.swap_in(layout, compensated)
        else:
            held = self._held(layout, compensated, keep)
            residual = self.memory.flat(layout, compensated)
            residual.copy_(compensated)
            residual.index_fill_(0, sent, 0)
        self.memory.mark(names, zero=False)
        if self.correction is not None and unless is None:
            if new_velocity is None:
                raise ValueError("momentum correction needs the `new_velocity` that compensate() returned")
            self.correction.commit(layout, new_velocity, sent)
        for view, saved in held:
            view.copy_(saved)
        self.loss_scales.set(names, scale)

    def clear(self, layout: Layout, like: torch.Tensor, scale: float = 1.0, keep: Collection[str] = ()) -> None:
        """Everything was sent (the bucket went dense): nothing is kept back, but for the
        parameters in ``keep``, whose state stays as it is."""
        if self.is_zero(layout):
            return
        held = self._held(layout, like, keep)
        for store in self.stores():
            store.flat(layout, like).zero_()
        for view, saved in held:
            view.copy_(saved)
        self.loss_scales.set((name for name, _ in layout), scale)
        if self.correction is None:
            self.memory.mark((name for name, _ in layout if name not in keep), zero=True)

    def state_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"residuals": self.memory.store.state_dict(), "scales": self.loss_scales.state_dict()}
        if self.correction is not None:
            out["velocity"] = self.correction.state_dict()
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.memory.load(state.get("residuals", {}))
        if self.correction is not None:
            self.correction.load_state_dict(state.get("velocity", {}))
        self.loss_scales.load_state_dict(state.get("scales", {}))

    def residual(self, name: str) -> Optional[torch.Tensor]:
        return self.memory.store.tensors.get(name)

    def names(self) -> List[str]:
        return list(self.memory.store.tensors)


def keep_error(
    feedback: ErrorFeedback,
    layout: Layout,
    compensated: torch.Tensor,
    sent: torch.Tensor,
    scale: float = 1.0,
    unless: Optional[torch.Tensor] = None,
) -> None:
    """Keep what a lossy encoding of every coordinate did not send: the residual becomes
    ``compensated - sent`` (``sent`` dense, laid out as ``compensated``). ``unless``: a
    device flag that keeps the state as it was, decided without a host read."""
    if feedback.correction is not None:
        raise ValueError("keep_error() sends every coordinate: momentum correction would clear them all")
    residual = feedback.memory.flat(layout, compensated)
    if unless is None:
        torch.sub(compensated, sent, out=residual)
    else:
        residual.copy_(torch.where(unless, residual, compensated - sent))
    names = [name for name, _ in layout]
    feedback.memory.mark(names, zero=False)
    feedback.loss_scales.set(names, scale)
