"""Random-k selection with a seed shared by all ranks."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from gradsparse.checks import check_density, check_int
from gradsparse.compressors.base import Compressor, CompressorState, k_for_density, make_payload
from gradsparse.payload import SparsePayload

__all__ = ["RandomK", "random_indices"]


def random_indices(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct uniformly random indices in ``[0, numel)`` without an O(numel)
    permutation: oversample with replacement, deduplicate, then subsample."""
    if k >= numel:
        return torch.arange(numel)
    chosen = torch.empty(0, dtype=torch.int64)
    draw = k + k // 8 + 16
    while chosen.numel() < k:
        fresh = torch.randint(numel, (draw,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, fresh]))
        draw *= 2
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep]


@dataclass(frozen=True)
class RandomK(Compressor):
    """``k = max(1, ceil(density * numel))`` uniformly random entries. The choice depends
    only on (seed, step, key), so every rank picks the same indices at a given step. With
    error feedback this is the unbiased-selection baseline of Stich et al. (NeurIPS 2018)."""

    density: float = 0.01
    seed: int = 0
    name = "randomk"
    budget_param = "density"
    selection_passes = 0.5
    density_based = True

    def __post_init__(self) -> None:
        check_density("density", self.density)
        check_int("seed", self.seed)

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        flat = self._check_input(tensor)
        step = state.step if state is not None else 0
        key = state.key if state is not None else ""
        mix = zlib.crc32(f"{self.seed}:{step}:{key}".encode())
        gen = torch.Generator().manual_seed(mix)
        k = k_for_density(self.density, flat.numel())
        return make_payload(flat, random_indices(flat.numel(), k, gen).to(flat.device))
