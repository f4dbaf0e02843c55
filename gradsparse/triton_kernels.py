"""The device route's hot pass as one Triton kernel (optional: the ``cuda`` extra).

:func:`compensate` does, in one read of the gradient, the residual and (with DGC momentum)
the velocity: the momentum step ``v = m * u + g``, the compensation ``c = v + r`` written
over the gradient, the magnitudes ``|c|`` that ``torch.topk`` selects from (a pass the
route no longer makes), and a non-finite flag raised by an atomic, read by nobody on the
host. The torch reference (:func:`compensate_reference`) is what the kernel must match: bit
for bit without momentum; with it, to the rounding of one fused multiply-add.

It runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported), which is how CI tests it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch

__all__ = ["BLOCK", "available", "compensate", "compensate_reference", "usable"]

BLOCK = 1024


@functools.cache
def _kernel() -> Any:
    """The jitted kernel, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def compensate_kernel(  # type: ignore[no-untyped-def]
        grad_ptr, residual_ptr, velocity_ptr, new_velocity_ptr, magnitude_ptr, flag_ptr, numel, momentum,
        HAS_RESIDUAL: tl.constexpr, HAS_VELOCITY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        value = tl.load(grad_ptr + offsets, mask=inside, other=0.0)
        if HAS_VELOCITY:
            value = momentum * tl.load(velocity_ptr + offsets, mask=inside, other=0.0) + value
            tl.store(new_velocity_ptr + offsets, value, mask=inside)
        if HAS_RESIDUAL:
            value = value + tl.load(residual_ptr + offsets, mask=inside, other=0.0)
        tl.store(grad_ptr + offsets, value, mask=inside)
        magnitude = tl.abs(value)
        tl.store(magnitude_ptr + offsets, magnitude, mask=inside)
        bad = (magnitude != magnitude) | (magnitude == float("inf"))  # noqa: PLR0124 - NaN, or +-inf
        tl.atomic_max(flag_ptr, tl.max(bad.to(tl.int32), axis=0))

    return (triton, compensate_kernel)


def available() -> bool:
    """Whether Triton is installed."""
    return _kernel() is not None


def usable(tensor: torch.Tensor) -> bool:
    """Whether :func:`compensate` runs on ``tensor``: Triton installed, a contiguous float32
    tensor, on CUDA (or on CPU under the interpreter)."""
    on_device = tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and tensor.dtype == torch.float32 and tensor.is_contiguous() and available()


def compensate(
    grad: torch.Tensor,
    residual: Optional[torch.Tensor],
    magnitude: torch.Tensor,
    flag: torch.Tensor,
    velocity: Optional[torch.Tensor] = None,
    new_velocity: Optional[torch.Tensor] = None,
    momentum: float = 0.0,
) -> None:
    """In place: ``grad`` becomes the compensated tensor, ``magnitude`` its absolute values,
    ``new_velocity`` (with ``velocity``) ``momentum * velocity + grad``; the int32
    ``flag[0]`` is raised to 1 if any compensated value is NaN or infinite (it is never
    lowered: zero it first)."""
    found = _kernel()
    if found is None:
        raise RuntimeError("gradsparse.triton_kernels needs Triton: pip install 'gradsparse[cuda]'")
    triton, kernel = found
    numel = grad.numel()
    if numel == 0:
        return
    has_velocity = velocity is not None
    if has_velocity and new_velocity is None:
        raise ValueError("compensate(velocity=...) needs `new_velocity`, where the new velocity is written")
    kernel[(triton.cdiv(numel, BLOCK),)](
        grad, residual if residual is not None else grad, velocity if has_velocity else grad,
        new_velocity if has_velocity else grad, magnitude, flag, numel, float(momentum),
        HAS_RESIDUAL=residual is not None, HAS_VELOCITY=has_velocity, BLOCK=BLOCK,
    )  # fmt: skip


def compensate_reference(
    grad: torch.Tensor,
    residual: Optional[torch.Tensor],
    velocity: Optional[torch.Tensor] = None,
    momentum: float = 0.0,
) -> tuple:
    """What :func:`compensate` computes, in torch: (compensated, magnitude, flag, new velocity)."""
    value = grad.clone()
    new_velocity = None
    if velocity is not None:
        value = momentum * velocity + value
        new_velocity = value.clone()
    if residual is not None:
        value = value + residual
    magnitude = value.abs()
    flag = int(not bool(torch.isfinite(value).all()))
    return value, magnitude, flag, new_velocity
