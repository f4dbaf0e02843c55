"""The sparse payload that compressors produce and collectives sum.

It is plain data: flat indices into a tensor of ``numel`` entries and the values at
those indices. It knows nothing about how it was selected or how it travels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Candidates", "SparsePayload", "index_dtype_for"]

INT32_LIMIT = 2**31


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices while they fit, int64 beyond 2**31 - 1 entries."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


class Candidates(NamedTuple):
    """Every entry of a tensor at or above a magnitude ``floor``: their ascending
    ``indices``, gathered by a caller that passed over the tensor anyway. A selection at a
    threshold at or above the floor reads only these entries."""

    floor: float
    indices: torch.Tensor


@dataclass(frozen=True)
class SparsePayload:
    """``values[i]`` belongs at flat position ``indices[i]`` of a tensor of ``numel``
    entries. Indices are unique within one payload."""

    indices: torch.Tensor
    values: torch.Tensor
    numel: int

    @classmethod
    def empty(cls, numel: int, like: torch.Tensor) -> SparsePayload:
        """No entries, for a tensor of ``numel`` entries of ``like``'s dtype and device."""
        return cls(
            torch.empty(0, dtype=index_dtype_for(numel), device=like.device),
            torch.empty(0, dtype=like.dtype, device=like.device),
            numel,
        )

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    @property
    def nbytes(self) -> int:
        return int(
            self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()
        )

    def validate(self) -> None:
        """Raise ``ValueError`` unless shapes, dtypes and index range are consistent."""
        if self.numel < 0:
            raise ValueError(f"payload numel must be >= 0, got {self.numel}")
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError(
                "payload indices and values must be 1-D, got shapes "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )
        if self.indices.numel() != self.values.numel():
            raise ValueError(f"payload has {self.indices.numel()} indices but {self.values.numel()} values")
        if self.indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"payload indices must be int32 or int64, got {self.indices.dtype}")
        if self.count and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.numel):
            raise ValueError(
                f"payload indices must lie in [0, {self.numel}), got range "
                f"[{int(self.indices.min())}, {int(self.indices.max())}]"
            )

    def to_dense(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scatter into a zero tensor (or add into ``out`` when given)."""
        if out is None:
            out = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        if self.count:
            out.index_add_(0, self.indices, self.values.to(out.dtype))
        return out
