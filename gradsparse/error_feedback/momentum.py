"""DGC's momentum correction (Lin et al., ICLR'18), kept apart from the residual memory.

``u = m * u + grad`` is what is compensated and selected from; once the step is committed
the sent coordinates of ``u`` are cleared (momentum factor masking), so a coordinate's
momentum does not keep pushing after it was sent. Use a momentum-free optimizer then: the
momentum is applied here, before compression."""

from __future__ import annotations

from typing import Any, Dict

import torch

from gradsparse.checks import check_probability
from gradsparse.store import Layout, ParamStore

__all__ = ["MomentumCorrection"]


class MomentumCorrection:
    """The velocity ``u`` per parameter name."""

    def __init__(self, momentum: float) -> None:
        self.momentum = check_probability("momentum", momentum)
        self.velocity = ParamStore()

    def apply(self, layout: Layout, grad: torch.Tensor) -> torch.Tensor:
        """``grad += m * u`` in place; returns the new velocity (a copy), for :meth:`commit`."""
        grad.add_(self.velocity.flat(layout, grad), alpha=self.momentum)
        return grad.clone()

    def commit(self, layout: Layout, new_velocity: torch.Tensor, sent: torch.Tensor) -> None:
        """The step is good: ``u`` becomes ``new_velocity`` with the ``sent`` indices cleared."""
        velocity = self.velocity.flat(layout, new_velocity)
        velocity.copy_(new_velocity)
        velocity.index_fill_(0, sent, 0)

    def state_dict(self) -> Dict[str, Any]:
        return self.velocity.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.velocity.load_state_dict(state)
