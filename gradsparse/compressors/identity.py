"""Dense passthrough through the sparse code path, for A/B runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gradsparse.compressors.base import Compressor, CompressorState
from gradsparse.payload import SparsePayload, index_dtype_for

__all__ = ["NoCompression"]


@dataclass(frozen=True)
class NoCompression(Compressor):
    """Sends every entry. Use it to compare against sparse runs through the same hook."""

    name = "none"
    selection_passes = 1.0
    sends_every_entry = True

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        flat = self._check_input(tensor)
        n = flat.numel()
        indices = torch.arange(n, dtype=index_dtype_for(n), device=flat.device)
        return SparsePayload(indices, flat.clone(), n)
