"""Adam's second moment, applied to each rank's own gradient before it is compressed.

Error feedback meets an adaptive optimizer badly: a coordinate is sent rarely, then in a
burst of accumulated residual, and Adam's per-coordinate second moment, fed with bursts
and zeros, no longer measures the gradient's scale (a coordinate sent every n steps sees
its second moment grow about n times, and moves about sqrt(n) times too little). Rescaling
the bursts does not help: one summed burst cannot tell signal from noise.

Each rank does see its own dense gradient every step. So the scale is taken there: every
rank keeps ``v = beta2 * v + (1 - beta2) * g**2`` of its local gradient, keyed by parameter
name, and divides the gradient by ``sqrt(v / (1 - beta2**t)) + eps`` before error feedback
and selection. What is compressed, kept and summed is then Adam's normalised gradient, a
linear quantity, which error feedback handles as it does SGD's (nothing is lost, only
delayed), and top-k selects by Adam's own measure of importance.
:class:`gradsparse.optim.SparseAdamW` applies the rest of Adam (first moment, bias
correction, decoupled weight decay) to the averaged result.

Each rank's ``v`` is its own (ranks see different data), but the ranks sum what they sent,
so replicas stay identical. Nothing extra is communicated.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch

from gradsparse.buffers import reusable
from gradsparse.checks import check_nonnegative, check_probability

__all__ = ["AdamPreconditioner"]


class AdamPreconditioner:
    """Per-parameter second moments of this rank's gradients, and the division by them.

    Args:
        beta2: the second moment's decay (Adam's ``betas[1]``).
        eps: added to the root of the bias-corrected second moment (Adam's ``eps``).
    """

    def __init__(self, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.beta2 = check_probability("beta2", beta2)
        self.eps = check_nonnegative("eps", eps, positive=True)
        self.second_moments: Dict[str, torch.Tensor] = {}
        self.steps: Dict[str, int] = {}
        self._scratch: Dict[str, torch.Tensor] = {}  # the divisor's buffer per parameter

    def apply(self, segments: Sequence[Tuple[str, int, int]], buffer: torch.Tensor) -> None:
        """Update the second moment of each named ``(name, offset, numel)`` span of the flat
        ``buffer`` with it, then divide the span by the moment's bias-corrected root, in
        place. A span that is all zeros (no gradient this step) stays zero."""
        beta2 = self.beta2
        for name, offset, numel in segments:
            grad = buffer[offset : offset + numel]
            v = self.second_moments.get(name)
            if v is None or v.shape != grad.shape or v.dtype != grad.dtype:
                v = self.second_moments[name] = torch.zeros_like(grad)
                self.steps[name] = 0
            self.steps[name] += 1
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = reusable(self._scratch, name, grad.shape, grad)  # no allocation per step
            torch.div(v, 1.0 - beta2 ** self.steps[name], out=denom).sqrt_().add_(self.eps)
            grad.div_(denom)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_scratch"] = {}  # as big as the moments
        return state

    def state_dict(self) -> Dict[str, Any]:
        return {
            "beta2": self.beta2,
            "eps": self.eps,
            "second_moments": dict(self.second_moments),
            "steps": dict(self.steps),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.second_moments = dict(state["second_moments"])
        self.steps = {name: int(t) for name, t in state["steps"].items()}
