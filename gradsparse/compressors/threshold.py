"""Threshold selection: every entry with ``|g| >= threshold``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from gradsparse.checks import check_density, check_nonnegative
from gradsparse.compressors.base import Compressor, CompressorState, k_for_density, make_payload
from gradsparse.compressors.selection import Magnitudes, _top_of_candidates
from gradsparse.payload import SparsePayload

__all__ = ["Threshold"]


@dataclass(frozen=True)
class Threshold(Compressor):
    """All entries with ``|g| >= threshold`` (Strom, Interspeech 2015). The count varies by
    step and rank. ``max_density`` caps it: past the cap, the largest
    ``ceil(max_density * numel)`` of those entries are sent instead."""

    threshold: float = 1e-3
    max_density: Optional[float] = None
    name = "threshold"
    budget_param = "threshold"
    selection_passes = 3.0

    def __post_init__(self) -> None:
        check_nonnegative("threshold", self.threshold)
        check_density("max_density", self.max_density, allow_none=True)

    def candidate_floor(
        self, state: CompressorState, like: torch.Tensor, values_at: Callable[[torch.Tensor], torch.Tensor]
    ) -> Optional[float]:
        """The threshold itself."""
        return float(self.threshold) if self.threshold > 0 else None

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        flat = self._check_input(tensor)
        mag = Magnitudes(flat, state)
        indices = mag.at_least(float(self.threshold))
        if self.max_density is not None:
            cap = k_for_density(self.max_density, flat.numel())
            if indices.numel() > cap:
                indices = _top_of_candidates(mag, indices, cap)
        return make_payload(flat, indices, ascending=True)
