"""The residual memory: what a worker did not send, per parameter name.

Besides the residuals themselves (a :class:`~gradsparse.store.ParamStore`, so one flat
view per layout), it knows which parameters' residuals are all zeros (everything was sent
dense: compensation is then a no-op) and keeps, per layout, a spare buffer that the fused
pass writes the compensated gradient into; keeping what was not sent then swaps buffers
instead of copying."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Set

import torch

from gradsparse.store import Layout, ParamStore

__all__ = ["Residuals"]


class Residuals:
    """Residuals by name, the names known to be zero, and the spare buffers."""

    def __init__(self) -> None:
        self.store = ParamStore()
        #: parameters whose residual is known to be all zeros (everything was sent dense)
        self.zero: Set[str] = set()
        #: per layout, the second buffer that the fused pass writes into
        self.spares: Dict[Layout, torch.Tensor] = {}

    def is_zero(self, layout: Layout) -> bool:
        """Whether every residual of ``layout`` is known to be zero, or was never kept."""
        stored = self.store.tensors
        return all(name in self.zero or name not in stored for name, _ in layout)

    def mark(self, names: Iterable[str], *, zero: bool) -> None:
        if zero:
            self.zero.update(names)
        else:
            self.zero.difference_update(names)

    def flat(self, layout: Layout, like: torch.Tensor) -> torch.Tensor:
        return self.store.flat(layout, like)

    def spare(self, layout: Layout, residual: torch.Tensor) -> torch.Tensor:
        """The second buffer of ``layout``. When DDP regroups parameters, the spares of the
        layouts that shared them go, as the store's flat tensors do."""
        spare = self.spares.get(layout)
        if spare is None or spare.shape != residual.shape or spare.dtype != residual.dtype:
            names = {name for name, _ in layout}
            for stale in [key for key in self.spares if key != layout and any(n in names for n, _ in key)]:
                del self.spares[stale]
            spare = self.spares[layout] = torch.empty_like(residual)
        return spare

    def is_spare(self, layout: Layout, tensor: torch.Tensor) -> bool:
        return tensor is self.spares.get(layout)

    def swap_in(self, layout: Layout, compensated: torch.Tensor) -> None:
        """``compensated`` (the spare) becomes the residual; the old residual the spare."""
        self.spares[layout] = self.store.swap(layout, compensated)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["spares"] = {}  # scratch, as big as the residuals
        return state

    def load(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.store.load_state_dict(tensors)
        self.zero.clear()
        self.spares.clear()
