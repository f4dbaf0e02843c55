"""The benchmark worker: one rank timing full DDP steps of one large parameter for each
configuration, after checking the result against a dense allreduce."""

# No `from __future__ import annotations`: DDP checks a hook's annotations as objects.
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from gradsparse.baselines import HALF, register_baseline
from gradsparse.comm import ring_allreduce_bytes
from gradsparse.timing import median_seconds

from .configs import Config
from .model_step import SPLIT, bench_model, busiest, hook_split, hook_traffic

__all__ = ["bench_one", "worker"]


def _shape(numel: int) -> Tuple[int, int]:
    return (numel // 1000, 1000) if numel % 1000 == 0 and numel >= 1000 else (1, numel)


def _pass_seconds(numel: int) -> float:
    x = torch.randn(numel)
    buf = torch.empty_like(x)
    return median_seconds(lambda: torch.abs(x, out=buf), repeats=4)


def _wire_counters(interface: Optional[str]) -> Optional[int]:
    if not interface:
        return None
    try:
        return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())
    except OSError:
        return None


class _Inject(torch.autograd.Function):
    """A scalar whose backward hands the parameter a prepared gradient: the step then costs
    what DDP and the hook cost, not a 100 MB gradient computation."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.grad = grad
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: torch.Tensor) -> Any:
        return ctx.grad, None


class _OneParameter(nn.Module):
    """One large parameter; its gradient is the one given to forward()."""

    def __init__(self, shape: Tuple[int, int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        return _Inject.apply(self.weight, grad)


def _register(cfg: Config, ddp: nn.parallel.DistributedDataParallel) -> Any:
    """Register ``cfg``'s method on ``ddp``; the sparse hook's state, or None."""
    import gradsparse as gs

    if cfg.method not in ("sparse", "ddp"):
        register_baseline(ddp, cfg.method)
    elif cfg.method == "sparse":
        min_numel = 1024 if cfg.model else 0  # a model's biases and norms stay dense, as by default
        return gs.register_sparse_hook(
            ddp, cfg.compressor, density=cfg.density, collective=cfg.collective, min_compress_numel=min_numel
        )
    return None


def _make(cfg: Config) -> Tuple[_OneParameter, nn.parallel.DistributedDataParallel, Any]:
    module = _OneParameter(_shape(cfg.numel))
    ddp = nn.parallel.DistributedDataParallel(
        module, bucket_cap_mb=cfg.numel * 4 / 2**20 + 1, gradient_as_bucket_view=True
    )
    return module, ddp, _register(cfg, ddp)


def _close(a: torch.Tensor, b: torch.Tensor, loose: bool = False) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-2 if loose else 1e-5, atol=1e-2 if loose else 1e-6))


def _check(cfg: Config, grad: torch.Tensor) -> Tuple[bool, str, float]:
    """One step on a fresh state against a dense allreduce (and, for sparse methods, the
    sum of every rank's own selection): (correct, how checked, relative error vs dense)."""
    from gradsparse import compressors

    world = dist.get_world_size()
    module, ddp, _ = _make(cfg)
    ddp(grad).backward()
    assert module.weight.grad is not None
    result = module.weight.grad.reshape(-1).clone()
    dense = grad.reshape(-1).clone()
    dist.all_reduce(dense)
    dense /= world
    rel_error = float(torch.linalg.vector_norm(result - dense) / torch.linalg.vector_norm(dense))
    if cfg.method == "noop":
        return True, "no communication (floor)", rel_error
    if cfg.method == "ddp" or cfg.method in HALF:
        return _close(result, dense, loose=cfg.method in HALF), "exact", rel_error
    if cfg.method.startswith("powersgd"):
        return True, "lossy (first steps are vanilla allreduce)", rel_error
    payload = compressors.build(cfg.compressor, density=cfg.density).compress(grad.reshape(-1))
    if cfg.collective == "shared_topk":  # a fresh state's first round is led by rank 0
        expected = _leader_sum(payload, grad.reshape(-1), cfg.density)
        return _close(result, expected), "exact (leader's indices)", rel_error
    local = payload.to_dense()
    dist.all_reduce(local)
    local /= world
    if cfg.collective == "oktopk":  # keeps the global top-k: a subset of the exact sparse sum
        chosen = result != 0
        return _close(result[chosen], local[chosen]), "subset", rel_error
    if cfg.collective == "auto":  # auto may have sent this bucket dense
        sparse_ok, dense_ok = _close(result, local), _close(result, dense)
        return sparse_ok or dense_ok, "exact (" + ("sparse" if sparse_ok else "dense") + ")", rel_error
    return _close(result, local), "exact", rel_error


def _leader_sum(mine: Any, grad: torch.Tensor, density: float) -> torch.Tensor:
    """The average of every rank's ``grad`` at rank 0's chosen indices (``mine`` on rank
    0, trimmed to its budget as the hook does)."""
    from gradsparse.compressors import k_for_density
    from gradsparse.engine.routes.shared_topk import trim

    chosen = torch.zeros(grad.numel(), dtype=torch.uint8)
    if dist.get_rank() == 0:
        chosen[trim(mine, k_for_density(density, grad.numel())).long()] = 1
    dist.broadcast(chosen, 0)
    expected = grad * chosen
    dist.all_reduce(expected)
    return expected / dist.get_world_size()


def _time(cfg: Config, grad: torch.Tensor, warmup: int, iters: int, interface: Optional[str]) -> Dict[str, Any]:
    """Median and quartiles of the step time, the time split, and bytes per step."""
    _, ddp, state = _make(cfg)
    times: List[float] = []
    split = dict.fromkeys(SPLIT, 0.0)
    sent: List[float] = []
    received: List[float] = []
    wire: List[int] = []
    for i in range(warmup + iters):
        before = state.stats() if state is not None else None
        tx = _wire_counters(interface)
        dist.barrier()
        start = time.perf_counter()
        ddp(grad).backward()  # through DDP's forward, so that its reducer runs
        elapsed = time.perf_counter() - start
        tx_after = _wire_counters(interface)
        if i < warmup:
            continue
        times.append(elapsed)
        if tx is not None and tx_after is not None:
            wire.append(tx_after - tx)
        if state is not None and before is not None:
            after = state.stats()
            for key, seconds in zip(SPLIT, hook_split(before, after)):
                split[key] += seconds / iters
            out, back = hook_traffic(before, after)
            sent.append(out)
            received.append(back)
    return {"times": times, "split": split, "sent": sent, "received": received, "wire": wire}


def _formula_bytes(cfg: Config, world: int) -> float:
    rows, cols = _shape(cfg.numel)
    low_rank = {"powersgd1": 1, "powersgd4": 4}.get(cfg.method)
    if low_rank is not None:
        return ring_allreduce_bytes(rows + cols, 4, world) * low_rank
    if cfg.method == "noop":
        return 0
    return ring_allreduce_bytes(cfg.numel, 2 if cfg.method in HALF else 4, world)


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bench_one(cfg: Config, warmup: int, iters: int, interface: Optional[str]) -> Dict[str, Any]:
    """One configuration on every rank: the row rank 0 reports (worst rank's figures)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    grad = torch.randn(_shape(cfg.numel), generator=torch.Generator().manual_seed(1234 + rank))
    ok, check, rel_error = _check(cfg, grad)
    timed = _time(cfg, grad, warmup, iters, interface)
    times = timed["times"]
    # The slowest rank decides the step: take the max over ranks of each statistic.
    summary = torch.tensor(
        [statistics.median(times), _quantile(times, 0.25), _quantile(times, 0.75)], dtype=torch.float64
    )
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    ok_all = torch.tensor([int(ok)])
    dist.all_reduce(ok_all, op=dist.ReduceOp.MIN)
    sent, received = busiest(timed["sent"], timed["received"], _formula_bytes(cfg, world))
    return {
        **cfg.__dict__,
        "label": cfg.label,
        "world": world,
        "median_s": float(summary[0]),
        "q1_s": float(summary[1]),
        "q3_s": float(summary[2]),
        "correct": bool(ok_all.item()),
        "check": check,
        "rel_error_vs_dense": rel_error,
        "bytes_per_rank": sent,
        "received_per_rank": received,
        "wire_bytes_per_rank": statistics.median(timed["wire"]) if timed["wire"] else None,
        "pass_s": _pass_seconds(cfg.numel),
        **timed["split"],
    }


def worker(spec_path: str) -> None:
    """One benchmark rank, started by the sweep with the spec file it wrote."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.FileStore(spec["store_file"], world)  # no listening socket for the rendezvous
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    for raw in spec["configs"]:
        cfg = Config(**raw)
        if cfg.model:
            row = bench_model(cfg, spec["warmup"], spec["iters"], spec.get("interface"), _register, _wire_counters)
        else:
            row = bench_one(cfg, spec["warmup"], spec["iters"], spec.get("interface"))
        if dist.get_rank() == 0:
            with open(spec["out"], "a") as fh:
                fh.write(json.dumps(row) + "\n")
    dist.barrier()
    time.sleep(0.2)  # let gloo's threads release the last work (README, "Shutting down")
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every row is on disk. Skip interpreter teardown: a gloo worker thread that releases a
    # hook's last work while Python finalises aborts the process (seen once in 4 runs).
    os._exit(0)


if __name__ == "__main__":  # started by the sweep: python -m gradsparse.bench.step SPEC
    worker(sys.argv[1])
