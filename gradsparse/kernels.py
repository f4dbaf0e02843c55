"""Optional compiled CPU kernels (numba), with the same results as the torch fallbacks.

- :func:`collect_abs_at_least` gathers the ascending indices of ``|x| >= t`` in one read
  pass, where torch needs three (``abs`` into a buffer, a compare into a bool mask,
  ``nonzero``).
- :func:`compensate_scan` is the hook's fused pass: it adds the error-feedback residual to
  the gradient in place and, in the same pass, checks that the result is finite, finds the
  parameters whose gradient is all zeros (no backward reached them) and gathers the indices
  whose compensated magnitude reaches a floor, so that selection need not read the tensor
  again.

Both work in blocks of 16 entries: the block's test is a branch-free loop that the compiler
vectorises, and only the few blocks with a hit are looked at entry by entry. They are used
for contiguous float32 and float64 CPU tensors when numba is installed (``pip install
'gradsparse[fast]'``) and ``GRADSPARSE_NO_NUMBA`` is not set; everything else, and CUDA,
uses torch. Compiled code is cached on disk, so only the first process pays for it.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["FusedScan", "available", "collect_abs_at_least", "compensate_scan", "supports"]

logger = logging.getLogger(__name__)

_BLOCK = 16


def _collect(x: Any, threshold: Any, out: Any) -> int:  # pragma: no cover - compiled
    n, capacity, count = x.shape[0], out.shape[0], 0
    whole = n - n % _BLOCK
    for b in range(0, whole, _BLOCK):
        hits = 0
        for j in range(_BLOCK):
            hits += abs(x[b + j]) >= threshold
        if hits:
            for j in range(_BLOCK):
                if abs(x[b + j]) >= threshold:
                    if count < capacity:
                        out[count] = b + j
                    count += 1
    for i in range(whole, n):
        if abs(x[i]) >= threshold:
            if count < capacity:
                out[count] = i
            count += 1
    return count


def _compensate_scan(
    g: Any, r: Any, has_residual: bool, ends: Any, threshold: Any, out: Any, nonzero: Any
) -> Tuple[int, bool]:  # pragma: no cover - compiled
    capacity, count, bad, start = out.shape[0], 0, 0, 0
    for s in range(ends.shape[0]):
        end, seen, i = ends[s], 0, start
        while i + _BLOCK <= end:
            hits = 0
            for j in range(_BLOCK):
                before = g[i + j]
                after = before + r[i + j] if has_residual else before
                g[i + j] = after
                seen |= before != 0
                bad |= (after - after) != 0  # NaN and +-inf give NaN
                hits += abs(after) >= threshold
            if hits:
                for j in range(_BLOCK):
                    if abs(g[i + j]) >= threshold:
                        if count < capacity:
                            out[count] = i + j
                        count += 1
            i += _BLOCK
        while i < end:
            before = g[i]
            after = before + r[i] if has_residual else before
            g[i] = after
            seen |= before != 0
            bad |= (after - after) != 0
            if abs(after) >= threshold:
                if count < capacity:
                    out[count] = i
                count += 1
            i += 1
        nonzero[s] = seen
        start = end
    return count, bad == 0


@functools.cache
def _compiled() -> Optional[Dict[str, Callable[..., Any]]]:
    if os.environ.get("GRADSPARSE_NO_NUMBA"):
        return None
    try:
        import numba
    except ImportError:
        logger.debug("numba is not installed: the CPU hot path uses torch (more passes)")
        return None
    jit = numba.njit(nogil=True, cache=True)
    return {"collect": jit(_collect), "compensate_scan": jit(_compensate_scan)}


def available() -> bool:
    """Whether the compiled kernels are in use."""
    return _compiled() is not None


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels apply to ``x``: numba present, a contiguous float32/float64 CPU
    tensor."""
    return (
        available()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous()
        and not x.requires_grad
    )


def collect_abs_at_least(x: torch.Tensor, threshold: float, out: torch.Tensor) -> Optional[int]:
    """Write the ascending indices ``i`` with ``|x[i]| >= threshold`` into ``out`` (int64,
    as many as fit) and return how many there are in all; None when the kernel does not
    apply (see :func:`supports`)."""
    kernels = _compiled()
    if kernels is None or not supports(x.detach()) or out.dtype != torch.int64:
        return None
    arr = x.detach().numpy()
    # compared in the tensor's dtype, as torch does with a Python scalar
    return int(kernels["collect"](arr, arr.dtype.type(threshold), out.numpy()))


@dataclass
class FusedScan:
    """What :func:`compensate_scan` found in its pass."""

    finite: bool
    #: per segment: whether its gradient held anything but zeros before compensation
    nonzero: Tuple[bool, ...]
    #: ascending int64 indices of ``|compensated| >= floor`` (None when no floor was given)
    large: Optional[torch.Tensor]


def compensate_scan(
    grad: torch.Tensor,
    residual: Optional[torch.Tensor],
    sizes: Sequence[int],
    floor: Optional[float],
    scratch: Dict[str, torch.Tensor],
) -> Optional[FusedScan]:
    """One pass over ``grad``: add ``residual`` (when given) in place, check finiteness,
    tell which of the consecutive segments of ``sizes`` entries had an all-zero gradient,
    and gather the indices where the result reaches ``floor``. ``scratch`` keeps the index
    buffer between calls. None when the kernel does not apply: nothing was done."""
    kernels = _compiled()
    if kernels is None or not supports(grad) or (residual is not None and not supports(residual)):
        return None
    if residual is not None and (residual.dtype != grad.dtype or residual.numel() != grad.numel()):
        return None
    g = grad.numpy()
    r = residual.numpy() if residual is not None else g[:0]
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
    if ends.size == 0 or int(ends[-1]) != g.shape[0]:
        raise ValueError(f"sizes add up to {int(ends[-1]) if ends.size else 0}, the gradient has {g.shape[0]} entries")
    threshold = g.dtype.type(np.inf if floor is None else floor)
    out = scratch.get("large")
    if out is None:
        out = scratch["large"] = torch.empty(max(1024, g.shape[0] // 32), dtype=torch.int64)
    nonzero = np.zeros(ends.shape[0], dtype=np.uint8)
    count, finite = kernels["compensate_scan"](g, r, residual is not None, ends, threshold, out.numpy(), nonzero)
    large = None
    if floor is not None:
        if count > out.numel():  # more than fit: the pass is done, gather them again
            out = scratch["large"] = torch.empty(count + count // 4, dtype=torch.int64)
            found = kernels["collect"](g, threshold, out.numpy())
            assert found == count
        large = out[:count].clone()
    return FusedScan(bool(finite), tuple(bool(z) for z in nonzero), large)
