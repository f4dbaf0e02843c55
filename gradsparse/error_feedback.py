"""Error feedback: what a worker does not send is kept and added to its next gradient.

State is keyed by parameter name, never by DDP bucket index, so it survives DDP's
bucket rebuild after the first iteration, ``no_sync()`` accumulation and
``find_unused_parameters``. For speed, the tensors of the parameters that are selected
together (one bucket, or one layer) are views into one flat buffer, so compensation is
a single add; when DDP regroups parameters the buffer is rebuilt by copying.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from gradsparse._validate import check_probability
from gradsparse.payload import SparsePayload

__all__ = ["Layout", "ParamStore", "ErrorFeedback"]

#: the parameters selected together, in order: (name, numel) pairs
Layout = Tuple[Tuple[str, int], ...]


class ParamStore:
    """Flat per-parameter tensors, keyed by name, served as one flat view per layout."""

    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        self._flat: Dict[Layout, torch.Tensor] = {}
        self._owner: Dict[str, Layout] = {}

    def flat(self, layout: Layout, like: torch.Tensor) -> torch.Tensor:
        """One flat tensor for ``layout`` whose slices are the named tensors (zeros for
        names not seen before)."""
        cached = self._flat.get(layout)
        if cached is not None and all(self._owner.get(name) == layout for name, _ in layout):
            return cached
        total = sum(n for _, n in layout)
        flat = torch.zeros(total, dtype=like.dtype, device=like.device)
        offset = 0
        for name, n in layout:
            old = self.tensors.get(name)
            view = flat[offset : offset + n]
            if old is not None:
                if old.numel() != n:
                    raise ValueError(
                        f"state for parameter {name!r} has {old.numel()} entries, but the "
                        f"parameter has {n}; was the checkpoint taken from another model?"
                    )
                view.copy_(old)
            self.tensors[name] = view
            self._owner[name] = layout
            offset += n
        self._flat = {
            key: t
            for key, t in self._flat.items()
            if key != layout and any(self._owner.get(name) == key for name, _ in key)
        }
        self._flat[layout] = flat
        return flat

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.tensors.items()}

    def load_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = {name: t.detach().clone().reshape(-1) for name, t in tensors.items()}
        self._flat.clear()
        self._owner.clear()

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())

    def norm(self) -> float:
        """Global L2 norm of all tensors (0 when empty)."""
        if not self.tensors:
            return 0.0
        return float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in self.tensors.values()]))
        )


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
        """Whether the residual of ``layout`` is known to be zero (compensation is a no-op)."""
        return not self.momentum and all(name in self._zero for name, _ in layout)

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

    def compensate(self, layout: Layout, grad: torch.Tensor, scale: float = 1.0) -> Optional[torch.Tensor]:
        """Turn ``grad`` (flat, laid out as ``layout``) into the compensated tensor in place.

        Nothing is committed yet: :meth:`update` does that once the step is known to be
        good, so a step that AMP skips leaves the state as it was. Returns the new
        momentum (with momentum correction) for :meth:`update`, else None. ``scale`` is
        the current loss scale when gradients are scaled (AMP)."""
        if self.is_zero(layout):
            return None
        self._rescale(layout, grad, scale)
        new_velocity = None
        if self.momentum:
            grad.add_(self.velocity.flat(layout, grad), alpha=self.momentum)
            new_velocity = grad.clone()
        grad.add_(self.residuals.flat(layout, grad))
        return new_velocity

    def update(
        self,
        layout: Layout,
        compensated: torch.Tensor,
        payload: SparsePayload,
        scale: float = 1.0,
        new_velocity: Optional[torch.Tensor] = None,
    ) -> None:
        """Keep what ``payload`` did not send. ``compensated`` must still hold the values
        that :meth:`compensate` produced, and ``new_velocity`` what it returned."""
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
        for name, _ in layout:
            self.scales[name] = scale

    def clear(self, layout: Layout, like: torch.Tensor, scale: float = 1.0) -> None:
        """Everything was sent (the bucket went dense): nothing is kept back."""
        if self.is_zero(layout):
            return
        self.residuals.flat(layout, like).zero_()
        if self.momentum:
            self.velocity.flat(layout, like).zero_()
        for name, _ in layout:
            self.scales[name] = scale
        if not self.momentum:
            self._zero.update(name for name, _ in layout)

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
