"""Top-k selection: exact, and the sampled fast path of Deep Gradient Compression."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gradsparse.checks import check_density, check_int, check_probability
from gradsparse.compressors.base import Compressor, CompressorState, k_for_density, make_payload
from gradsparse.compressors.selection import (
    Magnitudes,
    _sample,
    _top_of_candidates,
    density_floor,
    topk_indices,
)
from gradsparse.payload import SparsePayload

__all__ = ["TopK", "SampledTopK"]

#: reuse the previous step's threshold while the sample expects this many times k from it
_REUSE_BAND = (0.75, 1.33)


@dataclass(frozen=True)
class TopK(Compressor):
    """Exactly ``k = max(1, ceil(density * numel))`` entries of largest magnitude; ties go
    to the lower index, so the choice is deterministic."""

    density: float = 0.01
    name = "topk"
    budget_param = "density"
    selection_passes = 6.0
    density_based = True

    def __post_init__(self) -> None:
        check_density("density", self.density)

    def candidate_floor(
        self, state: CompressorState, like: torch.Tensor, values_at: Callable[[torch.Tensor], torch.Tensor]
    ) -> Optional[float]:
        return density_floor(self.density, state, like, values_at)

    def exact_count(self, numel: int) -> Optional[int]:
        return k_for_density(self.density, numel)

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        flat = self._check_input(tensor)
        k = k_for_density(self.density, flat.numel())
        return make_payload(flat, topk_indices(Magnitudes(flat, state), k), ascending=True)


@dataclass(frozen=True)
class SampledTopK(Compressor):
    """About k entries of largest magnitude, from a threshold estimated on a sample (Lin
    et al., "Deep Gradient Compression", ICLR 2018).

    The threshold starts from the previous step's value when there is one (as Ok-Topk
    reuses thresholds), else from a fixed random sample. While the count falls outside
    ``[(1 - tolerance) k, (1 + tolerance) k]`` it is refined from the sample's ranks,
    bracketed so that it converges; after ``max_refinements`` the exact top-k of the
    candidates is taken instead. The count is therefore always within tolerance.
    """

    density: float = 0.01
    tolerance: float = 0.1
    max_refinements: int = 6
    reuse_threshold: bool = True
    name = "sampled_topk"
    budget_param = "density"
    density_based = True

    def __post_init__(self) -> None:
        check_density("density", self.density)
        check_probability("tolerance", self.tolerance)
        check_int("max_refinements", self.max_refinements)

    def candidate_floor(
        self, state: CompressorState, like: torch.Tensor, values_at: Callable[[torch.Tensor], torch.Tensor]
    ) -> Optional[float]:
        return density_floor(self.density, state, like, values_at)

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        flat = self._check_input(tensor)
        n = flat.numel()
        k = k_for_density(self.density, n)
        if k >= n or n == 0:
            return make_payload(flat, torch.arange(n, device=flat.device))
        mag = Magnitudes(flat, state)
        low = max(1, math.ceil((1.0 - self.tolerance) * k))
        high = max(low, math.floor((1.0 + self.tolerance) * k))
        indices = self._select(mag, k, low, high, state)
        return make_payload(flat, indices, ascending=True)

    def _select(self, mag: Magnitudes, k: int, low: int, high: int, state: Optional[CompressorState]) -> torch.Tensor:
        previous = state.scalars.get("threshold") if (state is not None and self.reuse_threshold) else None
        too_many, too_few = 0.0, math.inf  # thresholds known to keep > high and < low entries
        n = mag.numel()
        sample = _sample(mag, k)  # small and cheap next to one pass over the tensor
        threshold = self._propose(sample, n, k)
        if previous is not None and previous > 0:
            # Reuse the last threshold unless the sample says it drifted far (error
            # feedback makes magnitudes grow between steps): a wrong start costs a pass.
            expected = int(torch.count_nonzero(sample >= previous)) * n / sample.numel()
            if _REUSE_BAND[0] * k <= expected <= _REUSE_BAND[1] * k:
                threshold = float(previous)
        for _ in range(self.max_refinements + 1):
            selected, count = mag.gather_up_to(threshold, high)
            if selected is not None and low <= count:
                if state is not None:
                    state.scalars["threshold"] = threshold
                return selected
            if count > high:
                too_many = max(too_many, threshold)
            else:
                too_few = min(too_few, threshold)
            guess = self._rescale(sample, n, k, threshold, count)
            threshold = self._bracket(guess, too_many, too_few)
        # Not converged (heavy ties or a pathological distribution): take the exact top-k.
        if too_many > 0.0:
            candidates = mag.at_least(too_many)
            indices = _top_of_candidates(mag, candidates, k)
        else:
            indices = topk_indices(mag, k)
        if state is not None:
            state.scalars["threshold"] = float(mag.take(indices).min())
        return indices

    @staticmethod
    def _propose(sample: torch.Tensor, n: int, k: int) -> float:
        rank = min(max(math.ceil(k * sample.numel() / n), 1), sample.numel())
        return float(sample[rank - 1])

    @staticmethod
    def _rescale(sample: torch.Tensor, n: int, k: int, threshold: float, count: int) -> float:
        """The sample rank that would give k if the sample is off by the same factor it
        was off at ``threshold``."""
        in_sample = int(torch.count_nonzero(sample >= threshold))
        if in_sample == 0 or count == 0:
            return threshold * (0.5 if count == 0 else 2.0)
        rank = min(max(round(in_sample * k / count), 1), sample.numel())
        return float(sample[rank - 1])

    @staticmethod
    def _bracket(guess: float, too_many: float, too_few: float) -> float:
        if too_many < guess < too_few:
            return guess
        if math.isinf(too_few):
            return max(too_many * 2.0, too_many + 1e-30)
        return 0.5 * (too_many + too_few)
