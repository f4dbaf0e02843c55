"""Where the hook's time goes in a whole training step: the ``--model`` layouts of
``gradsparse-bench run`` on 2 gloo ranks over loopback (no link limit: what is left over
the floor is our own CPU work), DDP's default buckets, SGD with momentum.

For each model it times a step with PyTorch's ``noop_hook``-like floor (no communication)
and with the sparse hook (top-k 1%, ``allgather`` and ``shared_topk``), unprofiled; then
profiles the sparse steps with ``torch.profiler`` on every thread (the continuation runs on
gloo's) and sums the hook's ``gradsparse.<stage>`` ranges per step (ms per step on both
ranks' rank 0, under the profiler, which inflates every op: compare stages with each
other and with the profiled step, not with the unprofiled one).

    python scripts/profile_step.py --models gpt2,resnet --out docs/bench/profile

A collective written ``allgather+sync_free`` forces the sync-free device route (fixed-size
messages, ``torch.topk`` selection) on these CPU ranks.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks

STAGES = ("prepare", "compensate", "select", "communicate", "commit", "decode", "write")


def _worker(rank: int, world: int, workdir: str, model_name: str, method: str, steps: int) -> None:
    import gradsparse as gs
    from gradsparse.bench.models import MODELS

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )  # fmt: skip
    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = spec.build()
    ddp = nn.parallel.DistributedDataParallel(model)
    if method == "noop":
        ddp.register_comm_hook(None, debugging_hooks.noop_hook)
    else:
        collective, _, route = method.partition("+")  # "allgather+sync_free": the device route, forced
        gs.register_sparse_hook(ddp, "topk", density=0.01, collective=collective, sync_free=route == "sync_free")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(i: int) -> None:
        x, y = spec.batch(rank, i)
        opt.zero_grad(set_to_none=True)
        spec.loss(ddp(x), y).backward()
        opt.step()

    for i in range(3):
        step(i)
    times = []
    for i in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step(3 + i)
        times.append(time.perf_counter() - start)
    row: Dict[str, Any] = {"model": model_name, "method": method, "step_ms": 1e3 * sorted(times)[len(times) // 2]}
    if method != "noop":
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        dist.barrier()
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities, experimental_config=config) as prof:
            for i in range(3):
                step(100 + i)
        row["profiled_ms"] = 1e3 * (time.perf_counter() - start) / 3
        ranges: Dict[str, float] = collections.Counter()
        for event in prof.key_averages():
            if event.key.startswith("gradsparse."):
                ranges[event.key.split(".", 1)[1]] += event.cpu_time_total / 3 / 1e3
        row["ranges_ms"] = dict(ranges)
    if rank == 0:
        (Path(workdir) / "row.json").write_text(json.dumps(row))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    # The row is on disk: skip teardown, where freeing DDP's reducer can deadlock with a gloo
    # thread that releases the last work and waits for the GIL (docs/collectives.md).
    os._exit(0)


def measure(model: str, method: str, steps: int) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(_worker, args=(2, workdir, model, method, steps), nprocs=2, start_method="spawn")
        row: Dict[str, Any] = json.loads((Path(workdir) / "row.json").read_text())
        return row


def breakdown(floor: Dict[str, Any], sparse: Dict[str, Any]) -> Dict[str, Any]:
    """The unprofiled step against the floor, and the stages' ms per step under the profiler."""
    return {
        "model": sparse["model"], "collective": sparse["method"], "floor_ms": floor["step_ms"],
        "step_ms": sparse["step_ms"], "over_ms": sparse["step_ms"] - floor["step_ms"],
        "x_floor": sparse["step_ms"] / floor["step_ms"], "profiled_ms": sparse["profiled_ms"],
        **{f"{s}_ms": sparse["ranges_ms"].get(s, 0.0) for s in STAGES},
    }  # fmt: skip


def table(rows: List[Dict[str, Any]]) -> str:
    head = (
        "| model | collective | floor (noop) | step | x floor | over floor | profiled step | "
        + " | ".join(STAGES) + " | stages |"
    )  # fmt: skip
    lines = [head, "|" + "---|" * (8 + len(STAGES))]
    for r in rows:
        cells = [f"{r[s + '_ms']:.1f}" for s in STAGES]
        total = sum(r[s + "_ms"] for s in STAGES)
        lines.append(
            f"| {r['model']} | {r['collective']} | {r['floor_ms']:.0f} ms | {r['step_ms']:.0f} ms | "
            f"{r['x_floor']:.2f} | {r['over_ms']:.1f} | {r['profiled_ms']:.0f} | "
            + " | ".join(cells)
            + f" | {total:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,resnet")
    parser.add_argument(
        "--collectives", default="allgather,shared_topk", help="each optionally +sync_free (the device route on CPU)"
    )
    parser.add_argument("--steps", type=int, default=7, help="timed steps (the median is kept)")
    parser.add_argument("--out", default=None, help="write results.jsonl and results.md here")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        floor = measure(model, "noop", args.steps)
        for collective in args.collectives.split(","):
            rows.append(breakdown(floor, measure(model, collective, args.steps)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print("\n" + text)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
