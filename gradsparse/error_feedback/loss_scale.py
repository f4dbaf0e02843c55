"""The AMP loss scale each parameter's error-feedback state is expressed in.

With AMP the gradients arrive multiplied by the loss scale. State is kept in the scale it
was made in and rescaled when the scale changes, so it stays in the gradient's own range
even in fp16. ``GradScaler`` moves the scale by powers of two, so rescaling is exact."""

from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch

from gradsparse.store import Layout, ParamStore

__all__ = ["LossScales"]


class LossScales:
    """Per parameter name, the loss scale its state is expressed in (1.0 without AMP)."""

    def __init__(self) -> None:
        self.scales: Dict[str, float] = {}

    def rescale(self, layout: Layout, stores: Sequence[ParamStore], like: torch.Tensor, scale: float) -> None:
        """Express the state of ``layout`` held in ``stores`` in the loss scale ``scale``."""
        stale = [(name, self.scales[name]) for name, _ in layout if self.scales.get(name, scale) != scale]
        if not stale:
            return
        for store in stores:
            store.flat(layout, like)
            for name, old in stale:
                store.tensors[name].mul_(scale / old)
        for name, _ in stale:
            self.scales[name] = scale

    def set(self, names: Iterable[str], scale: float) -> None:
        """The state of ``names`` is now expressed in ``scale``."""
        for name in names:
            self.scales[name] = scale

    def state_dict(self) -> Dict[str, float]:
        return dict(self.scales)

    def load_state_dict(self, scales: Dict[str, float]) -> None:
        self.scales = {name: float(v) for name, v in scales.items()}
