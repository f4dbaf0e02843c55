"""Reusable work buffers: one helper for every piece that keeps scratch memory between
steps (compressors, collectives, the hook). Allocations over 32 MB are mmapped and cost
page faults each time, so large temporaries are kept and reused instead."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch

__all__ = ["reusable"]


def reusable(
    cache: Dict[str, torch.Tensor],
    name: str,
    shape: Union[int, Sequence[int]],
    like: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``cache[name]``, an uninitialised tensor of ``shape`` on ``like``'s device (and dtype,
    unless ``dtype`` is given), reallocated only when the shape, dtype or device change."""
    size = torch.Size([shape] if isinstance(shape, int) else shape)
    dtype = dtype or like.dtype
    buf = cache.get(name)
    if buf is None or buf.shape != size or buf.dtype != dtype or buf.device != like.device:
        buf = torch.empty(size, dtype=dtype, device=like.device)
        cache[name] = buf
    return buf
