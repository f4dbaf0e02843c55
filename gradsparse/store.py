"""Flat per-parameter tensors keyed by parameter name, served as one flat view per group.

Error feedback keeps its residuals (and DGC momentum) here, and the hook keeps the
compressors' per-coordinate buffers here too. State is keyed by parameter name, never by
DDP bucket index, so it survives DDP's bucket rebuild after the first iteration. For
speed, the tensors of the parameters that are selected together (one bucket, or one
layer) are views into one flat buffer; when DDP regroups parameters the buffer is rebuilt
by copying.
"""

from __future__ import annotations

from typing import Collection, Dict, Iterator, List, Tuple

import torch

__all__ = ["Layout", "ParamStore", "spans"]

#: the parameters selected together, in order: (name, numel) pairs
Layout = Tuple[Tuple[str, int], ...]


class ParamStore:
    """Flat per-parameter tensors, keyed by name, served as one flat view per layout."""

    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}
        self._flat: Dict[Layout, torch.Tensor] = {}
        self._owner: Dict[str, Layout] = {}

    def flat(self, layout: Layout, like: torch.Tensor) -> torch.Tensor:
        """One flat tensor for ``layout`` whose slices are the named tensors (zeros for
        names not seen before)."""
        cached = self._flat.get(layout)
        if cached is not None and all(self._owner.get(name) == layout for name, _ in layout):
            return cached
        total = sum(n for _, n in layout)
        flat = torch.zeros(total, dtype=like.dtype, device=like.device)
        offset = 0
        for name, n in layout:
            old = self.tensors.get(name)
            view = flat[offset : offset + n]
            if old is not None:
                if old.numel() != n:
                    raise ValueError(
                        f"state for parameter {name!r} has {old.numel()} entries, but the "
                        f"parameter has {n}; was the checkpoint taken from another model?"
                    )
                view.copy_(old)
            self.tensors[name] = view
            self._owner[name] = layout
            offset += n
        self._flat = {
            key: t
            for key, t in self._flat.items()
            if key != layout and any(self._owner.get(name) == key for name, _ in key)
        }
        self._flat[layout] = flat
        return flat

    def swap(self, layout: Layout, flat: torch.Tensor) -> torch.Tensor:
        """Make ``flat`` (laid out as ``layout``) the storage of its tensors, without
        copying, and return the flat tensor it replaces (for reuse)."""
        old = self.flat(layout, flat)
        if flat.shape != old.shape or flat.dtype != old.dtype or flat.device != old.device:
            raise ValueError(f"swap needs a tensor like the stored one {tuple(old.shape)}; got {tuple(flat.shape)}")
        offset = 0
        for name, n in layout:
            self.tensors[name] = flat[offset : offset + n]
            offset += n
        self._flat[layout] = flat
        return old

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.tensors.items()}

    def load_state_dict(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.tensors = {name: t.detach().clone().reshape(-1) for name, t in tensors.items()}
        self._flat.clear()
        self._owner.clear()

    def __iter__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())

    def norm(self) -> float:
        """Global L2 norm of all tensors (0 when empty)."""
        if not self.tensors:
            return 0.0
        return float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in self.tensors.values()]))
        )


def spans(layout: Layout, names: Collection[str]) -> List[Tuple[int, int]]:
    """[start, end) of each named parameter in a flat tensor laid out as ``layout``."""
    if not names:
        return []
    out, offset = [], 0
    for name, n in layout:
        if name in names:
            out.append((offset, offset + n))
        offset += n
    return out
