"""The benchmark worker for ``--model``: whole training steps (forward, backward with the
hook in DDP's own buckets, the optimizer step) of a real architecture on synthetic data."""

# No `from __future__ import annotations`: DDP checks a hook's annotations as objects.
import hashlib
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from gradsparse.baselines import baseline_bucket_cap_mb, baseline_bytes

from .configs import Config
from .models import MODELS

__all__ = ["SPLIT", "bench_model", "busiest", "formula_bytes", "hook_split", "hook_traffic"]

#: the hook's own timers (:class:`gradsparse.engine.stats.HookStats`), summed over a step's buckets:
#: select (bucket in hand to message sent), communicate (sent to the sum's arrival), decode
SPLIT = ("compress_s", "communicate_s", "decompress_s")


def formula_bytes(cfg: Config, model: nn.Module, world: int) -> int:
    """Bytes per rank and step of a baseline, from its algorithm (:func:`gradsparse.baselines.baseline_bytes`)."""
    return baseline_bytes(cfg.method, model.parameters(), world)


def hook_traffic(before: Dict[str, float], after: Dict[str, float]) -> Tuple[float, float]:
    """Bytes the hook sent (payload and headers) and received between two ``stats()``."""
    sent = after["bytes_sent"] - before["bytes_sent"] + after["control_bytes"] - before["control_bytes"]
    return sent, after["bytes_received"] - before["bytes_received"]


def busiest(sent: List[float], received: List[float], formula: float) -> Tuple[float, float]:
    """Bytes sent and received per step by the busiest rank (each the largest mean over
    the timed steps across ranks: under shared_topk the leader, which sends most, turns
    round); ``formula`` both ways for the baselines, which the hook does not count."""
    mine = torch.tensor(
        [statistics.fmean(sent) if sent else formula, statistics.fmean(received) if received else formula],
        dtype=torch.float64,
    )
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine[0]), float(mine[1])


def _fingerprint(model: nn.Module) -> int:
    """A 63-bit hash of every parameter's bytes: equal on every rank iff the replicas are."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def _replicas_identical(model: nn.Module) -> bool:
    mine = torch.tensor([_fingerprint(model)], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return all(int(v) == int(mine) for v in everyone)


def _verdict(identical: bool, one_bucket: bool) -> str:
    return ("replicas identical" if identical else "replicas differ") + (", one bucket" if one_bucket else "")


def hook_split(before: Dict[str, float], after: Dict[str, float]) -> List[float]:
    """Seconds of each of the hook's :data:`SPLIT` timers between two ``stats()``."""
    return [after[key] - before[key] for key in SPLIT]


def _steps(spec: Any, ddp: Any, state: Any, warmup: int, iters: int, interface: Optional[str], counters: Any) -> Any:
    """Run the steps; per timed step: seconds, hook bytes sent and received, the hook's
    stage timers, wire bytes; and every step's loss."""
    rank = dist.get_rank()
    opt = torch.optim.SGD(ddp.module.parameters(), lr=0.01, momentum=0.9)
    times: List[float] = []
    sent: List[float] = []
    received: List[float] = []
    split: List[List[float]] = []
    wire: List[int] = []
    losses: List[float] = []
    for i in range(warmup + iters):
        x, y = spec.batch(rank, i)
        before = state.stats() if state is not None else None
        tx = counters(interface)
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = spec.loss(ddp(x), y)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - start
        tx_after = counters(interface)
        losses.append(float(loss.detach()))
        if i < warmup:
            continue
        times.append(elapsed)
        if tx is not None and tx_after is not None:
            wire.append(tx_after - tx)
        if state is not None and before is not None:
            after = state.stats()
            out, back = hook_traffic(before, after)
            sent.append(out)
            received.append(back)
            split.append(hook_split(before, after))
    return times, sent, received, split, wire, losses


def bench_model(
    cfg: Config, warmup: int, iters: int, interface: Optional[str], register: Any, wire_counters: Any
) -> Dict[str, Any]:
    """Time ``warmup + iters`` training steps of ``cfg.model`` with ``cfg``'s method,
    registered by ``register(cfg, ddp)``; the slowest rank's median decides."""
    spec = MODELS[cfg.model]
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = spec.build()
    # DDP's own default buckets, except under PowerSGD: one bucket (baseline_bucket_cap_mb: a gloo hang with two)
    one_bucket = cfg.method.startswith("powersgd")
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=baseline_bucket_cap_mb(cfg.method, model))
    state = register(cfg, ddp)
    times, sent, received, split, wire, losses = _steps(spec, ddp, state, warmup, iters, interface, wire_counters)
    # the slowest rank decides: each statistic's largest value over the ranks
    stages = [statistics.fmean(column) for column in zip(*split)] if split else [0.0] * len(SPLIT)
    worst = torch.tensor([statistics.median(times), min(times), max(times), *stages], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    identical = _replicas_identical(model) or cfg.method == "noop"  # noop: every rank its own model
    busiest_sent, busiest_received = busiest(sent, received, formula_bytes(cfg, model, world))
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        **cfg.__dict__,
        "numel": numel,
        "label": cfg.label,
        "world": world,
        "median_s": float(worst[0]),
        "q1_s": float(worst[1]),  # min and max here: few steps of a whole model
        "q3_s": float(worst[2]),
        "samples_per_s": world * spec.samples / float(worst[0]),
        "correct": identical,
        "check": "no communication (floor)" if cfg.method == "noop" else _verdict(identical, one_bucket),
        "rel_error_vs_dense": None,
        "bytes_per_rank": busiest_sent,
        "received_per_rank": busiest_received,
        "wire_bytes_per_rank": statistics.median(wire) if wire else None,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "pass_s": 0.0,
        **{key: float(value) for key, value in zip(SPLIT, worst[3:])},  # per step, mean of the timed steps
    }
