"""Variance-based selection (Tsuzuku, Imachi and Akiba, "Variance-based Gradient
Compression for Efficient Distributed Deep Learning", ICLR 2018 workshop,
arXiv:1802.06058).

An entry is sent when its accumulated value ``r`` is large against the accumulated
variance ``v`` of that value: ``r**2 > alpha * v``. After it is sent both are reset;
entries not sent keep ``r`` (through error feedback) and their ``v`` decays by ``decay``
each step before the new variance is added.

Variance estimator. The paper accumulates per-sample squared gradients, which a DDP
communication hook never sees: it gets the bucket's already-summed gradient. We
therefore estimate each coordinate's step-to-step variance with exponential moving
averages over steps (West's incremental form, smoothing ``beta``)::

    d = g - mean;  mean += (1 - beta) * d;  var = beta * (var + (1 - beta) * d**2)

On the first observation of a coordinate there is no spread to measure, so we take the
uninformed prior ``var = g**2`` (noise as large as the signal), which sends nothing on the
first step instead of everything. Coordinates whose gradient is steady relative to its
spread (high signal, low noise) cross the criterion after few steps; noisy ones, even
large ones, wait until their accumulated mean outgrows the accumulated noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gradsparse.checks import check_density, check_nonnegative, check_probability
from gradsparse.compressors.base import Compressor, CompressorState, k_for_density, make_payload
from gradsparse.compressors.selection import _top_of_candidates, flat_nonzero
from gradsparse.payload import SparsePayload

__all__ = ["VarianceBased"]


@dataclass(frozen=True)
class VarianceBased(Compressor):
    alpha: float = 1.0
    beta: float = 0.9
    decay: float = 0.999
    max_density: Optional[float] = None
    name = "variance"
    budget_param = "alpha"
    selection_passes = 8.0
    state_buffers = ("mean", "var", "acc_var")

    def __post_init__(self) -> None:
        check_nonnegative("alpha", self.alpha)
        check_probability("beta", self.beta)
        check_probability("decay", self.decay, closed_high=True)
        check_density("max_density", self.max_density, allow_none=True)

    def observe(self, grad: torch.Tensor, state: CompressorState) -> None:
        g = grad.reshape(-1)
        mean, var, acc = (state.buffers[name] for name in self.state_buffers)
        if state.scalars.get("observations", 0) == 0:
            mean.copy_(g)
            torch.mul(g, g, out=var)
        else:
            d = g - mean
            mean.add_(d, alpha=1.0 - self.beta)
            var.addcmul_(d, d, value=1.0 - self.beta).mul_(self.beta)
        acc.mul_(self.decay).add_(var)
        state.scalars["observations"] = state.scalars.get("observations", 0) + 1

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        if state is None or "acc_var" not in state.buffers:
            raise ValueError(
                "the variance compressor needs a CompressorState with its buffers "
                f"{list(self.state_buffers)}; use it through SparseHookState"
            )
        flat = self._check_input(tensor)
        acc = state.buffers["acc_var"]
        score = flat * flat  # r**2
        indices = flat_nonzero(score > acc * self.alpha)
        if self.max_density is not None:
            cap = k_for_density(self.max_density, flat.numel())
            if indices.numel() > cap:
                ratio = score[indices] / acc[indices].clamp_min(torch.finfo(acc.dtype).tiny)
                full = torch.zeros_like(flat)
                full[indices] = ratio
                indices = _top_of_candidates(full, indices, cap)
        acc[indices] = 0
        return make_payload(flat, indices)
