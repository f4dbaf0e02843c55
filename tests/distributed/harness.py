"""Spawn real gloo ranks that meet through a file store, and collect their results."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "flat_params", "gather_all"]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
    )
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # report to the parent with the traceback
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(workdir, f"result{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks and return
    each rank's result; re-raise the first rank's error with its traceback."""
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(
            _entry, args=(fn, world_size, workdir, args), nprocs=world_size, start_method="spawn"
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(workdir, f"result{rank}.pkl"), "rb") as fh:
                results.append(pickle.load(fh))
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(results) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def gather_all(tensor: torch.Tensor) -> List[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out
