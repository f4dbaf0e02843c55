"""PyTorch's own communication hooks, registered by name: the baselines every comparison
measures beside the sparse hook (the benchmarks, ``gradsparse-train --compare``).

``noop`` (no communication: the floor), ``bf16`` and ``fp16`` (every gradient cast to 16
bits and allreduced), ``powersgd<R>`` (PowerSGD of rank R with error feedback and warm
start, every matrix compressed from the third step on).
"""

import re
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from gradsparse.comm import ring_allreduce_bytes

__all__ = ["HALF", "baseline_bucket_cap_mb", "baseline_bytes", "bf16_hook", "check_baseline", "register_baseline"]

#: the baselines that halve the bytes by casting to a 16-bit type
HALF = ("bf16", "fp16")
_POWERSGD = re.compile(r"^powersgd([1-9][0-9]*)$")


def check_baseline(method: str) -> None:
    """Raise ValueError unless ``method`` names a baseline hook."""
    if method not in ("noop", *HALF) and not _POWERSGD.match(method):
        raise ValueError(
            "Expected a baseline hook 'noop', 'bf16', 'fp16' or 'powersgd<RANK>' (e.g. 'powersgd1'), "
            f"but got {method!r}."
        )


# (no ``from __future__ import annotations`` here: DDP checks the hook's ``bucket`` annotation
# against dist.GradBucket itself, not its name)
def bf16_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's own ``bf16_compress_hook``, unchanged. DDP refuses that hook by name unless
    it runs on CUDA with NCCL, but gloo sums bf16 as well, so it is called through this."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(state, bucket)


def baseline_bucket_cap_mb(method: str, model: nn.Module, default: float = 25.0) -> float:
    """The ``bucket_cap_mb`` to build DDP with for ``method``: one bucket for PowerSGD.
    PowerSGD's hook waits on an allreduce inside a future's callback, which on gloo runs on
    one of its two worker threads; with two buckets in flight both threads wait and the
    step hangs (seen on the benchmarks' models and on ``gradsparse-train --model chargpt``)."""
    if not _POWERSGD.match(method):
        return default
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 + 1


def register_baseline(ddp: nn.parallel.DistributedDataParallel, method: str) -> Optional[Any]:
    """Register baseline ``method`` on ``ddp``; PowerSGD's state, or None."""
    from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks, default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    check_baseline(method)
    if method == "noop":
        ddp.register_comm_hook(None, debugging_hooks.noop_hook)
        return None
    if method in HALF:
        ddp.register_comm_hook(None, bf16_hook if method == "bf16" else default_hooks.fp16_compress_hook)
        return None
    match = _POWERSGD.match(method)
    assert match is not None
    state = powersgd.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=int(match.group(1)),
        start_powerSGD_iter=2,
        min_compression_rate=0.0,
        use_error_feedback=True,
        warm_start=True,
    )
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)
    return state


def baseline_bytes(method: str, params: Iterable[torch.Tensor], world: int) -> int:
    """Bytes per rank and step of a baseline, from its algorithm: DDP's ring allreduce of
    every gradient (``"ddp"``; in 16 bits for bf16/fp16); PowerSGD's two factor allreduces
    per matrix (rows + columns times the rank) and a plain allreduce of the vectors."""
    tensors = [p for p in params if p.requires_grad]
    if method == "noop":
        return 0
    match = _POWERSGD.match(method)
    if match is not None:
        rank = int(match.group(1))
        total = 0
        for p in tensors:
            if p.dim() > 1:
                rows, cols = p.shape[0], p.numel() // p.shape[0]
                total += ring_allreduce_bytes(min(rank, rows, cols) * (rows + cols), 4, world)
            else:
                total += ring_allreduce_bytes(p.numel(), 4, world)
        return total
    numel = sum(p.numel() for p in tensors)
    return ring_allreduce_bytes(numel, 2 if method in HALF else 4, world)
