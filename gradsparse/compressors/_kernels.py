"""Optional compiled CPU kernels (numba), with the same results as the torch fallbacks.

``collect_abs_at_least`` gathers the indices of ``|x| >= t`` in one read pass, where torch
needs three (``abs`` into a buffer, a compare into a bool mask, ``nonzero``). It is used
for float32 and float64 CPU tensors when numba is installed (``pip install
'gradsparse[fast]'``) and ``GRADSPARSE_NO_NUMBA`` is not set; everything else, and CUDA,
uses torch. Compiled code is cached on disk, so only the first process pays for it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Optional

import torch

__all__ = ["available", "collect_abs_at_least"]

logger = logging.getLogger(__name__)


@functools.cache
def _compile() -> Optional[Callable[..., int]]:
    if os.environ.get("GRADSPARSE_NO_NUMBA"):
        return None
    try:
        import numba
    except ImportError:
        logger.debug("numba is not installed: selection uses torch (three passes instead of one)")
        return None

    def collect(x: Any, threshold: Any, out: Any) -> int:  # pragma: no cover - compiled
        count = 0
        capacity = out.shape[0]
        for i in range(x.shape[0]):
            if abs(x[i]) >= threshold:
                if count < capacity:
                    out[count] = i
                count += 1
        return count

    return numba.njit(nogil=True, cache=True)(collect)


def available() -> bool:
    """Whether the compiled kernels are in use."""
    return _compile() is not None


def collect_abs_at_least(x: torch.Tensor, threshold: float, out: torch.Tensor) -> Optional[int]:
    """Write the ascending indices ``i`` with ``|x[i]| >= threshold`` into ``out`` (int64,
    as many as fit) and return how many there are in all; None when the kernel does not
    apply (no numba, not a contiguous float32/float64 CPU tensor)."""
    kernel = _compile()
    if kernel is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if not x.is_contiguous() or out.dtype != torch.int64:
        return None
    arr = x.detach().numpy()
    # compared in the tensor's dtype, as torch does with a Python scalar
    return int(kernel(arr, arr.dtype.type(threshold), out.numpy()))
