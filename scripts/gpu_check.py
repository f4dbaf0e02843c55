"""The measured half of ``scripts/gpu-check``: on a CUDA device, time selection (torch.topk
against the device route's fused pass + torch.topk) and the hook's training step (DDP's
allreduce against the sync-free route, gloo ranks sharing the GPU and NCCL with one rank),
count host syncs with ``torch.cuda.set_sync_debug_mode``, and write the tables with the
device's name. Without CUDA it counts the host-syncing ops of the same training step on CPU
(``sync_free=True``, profiled on every thread) and writes nothing.

    python scripts/gpu_check.py --out docs/bench/cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradsparse.engine.routes.device import HOST_SYNCING_OPS


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    width = 2048 if device == "cuda" else 1024
    return nn.Sequential(
        nn.Linear(512, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 512)
    ).to(device)


def _time_cuda(fn: Any, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def selection_rows(numel: int, density: float) -> List[Dict[str, Any]]:
    """ms per call on the device: torch.topk of |x| (sorted, unsorted), and the route's
    fused compensation (Triton) + unsorted torch.topk of the magnitudes it wrote."""
    from gradsparse import triton_kernels

    k = max(1, int(density * numel))
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad, residual = torch.randn(numel, device="cuda", generator=gen), torch.randn(numel, device="cuda", generator=gen)
    rows = [
        {"what": "torch.topk(|x|), sorted", "ms": _time_cuda(lambda: torch.topk(grad.abs(), k))},
        {"what": "torch.topk(|x|), unsorted", "ms": _time_cuda(lambda: torch.topk(grad.abs(), k, sorted=False))},
        {
            "what": "x + r, then torch.topk(|x + r|) (unfused route)",
            "ms": _time_cuda(lambda: torch.topk((grad + residual).abs(), k, sorted=False)),
        },
    ]
    if triton_kernels.available():
        work, magnitude = grad.clone(), torch.empty_like(grad)
        flag = torch.zeros(1, dtype=torch.int32, device="cuda")

        def fused() -> None:
            work.copy_(grad)
            triton_kernels.compensate(work, residual, magnitude, flag)
            torch.topk(magnitude, k, sorted=False)

        copy_ms = _time_cuda(lambda: work.copy_(grad))
        rows.append(
            {"what": "Triton compensate + torch.topk(magnitudes) (device route)", "ms": _time_cuda(fused) - copy_ms}
        )
    for row in rows:
        row.update(numel=numel, density=density)
    return rows


def _step_worker(rank: int, world: int, workdir: str, backend: str, mode: str, steps: int) -> None:
    import gradsparse as gs

    if backend == "nccl" or torch.cuda.is_available():
        torch.cuda.set_device(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group(
        backend, init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    model = _model(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0] if backend == "nccl" else None)
    if mode != "ddp":
        gs.register_sparse_hook(ddp, "topk", density=0.01, collective=mode, sync_free=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    syncs: List[str] = []

    def step(i: int) -> None:
        x = torch.randn(64, 512, device=device, generator=torch.Generator(device).manual_seed(10 * i + rank))
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()

    for i in range(3):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp(torch.randn(64, 512, device=device)).pow(2).mean().backward()
        torch.cuda.set_sync_debug_mode(0)
        syncs = sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})
        torch.cuda.synchronize()
    else:
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], experimental_config=config) as p:
            ddp(torch.randn(64, 512)).pow(2).mean().backward()
        syncs = sorted(e.name for e in p.events() if e.name in HOST_SYNCING_OPS)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - started) / steps
    if rank == 0:
        row = {"backend": backend, "ranks": world, "route": mode, "step_ms": ms, "syncs": syncs, "device": device}
        (Path(workdir) / "row.json").write_text(json.dumps(row))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    # The row is on disk: skip teardown, where freeing DDP's reducer can deadlock with a gloo
    # thread that releases the last work and waits for the GIL (docs/collectives.md).
    os._exit(0)


def step_row(backend: str, world: int, mode: str, steps: int) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(
            _step_worker, args=(world, workdir, backend, mode, steps), nprocs=world, start_method="spawn"
        )
        row: Dict[str, Any] = json.loads((Path(workdir) / "row.json").read_text())
        return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write results.jsonl and results.md here (CUDA only)")
    parser.add_argument("--numel", type=float, default=25e6)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not torch.cuda.is_available():
        print("no CUDA device: counting the host-syncing ops of a sync-free training step on CPU")
        bad = 0
        for mode in ("allgather", "shared_topk"):
            row = step_row("gloo", 2, mode, steps=3)
            print(f"  gloo x2, {mode}: {len(row['syncs'])} host-syncing ops {row['syncs']}")
            bad += len(row["syncs"])
        print("the device parts (timings, set_sync_debug_mode, NCCL) need a GPU: run scripts/gpu-check there")
        return 1 if bad else 0
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}, torch {torch.__version__}, python {platform.python_version()}")
    rows: List[Dict[str, Any]] = []
    for row in selection_rows(int(args.numel), 0.01):
        rows.append({"table": "selection", "device_name": name, **row})
        print(f"  select {row['what']:<60} {row['ms']:8.2f} ms")
    runs = [("gloo", 2, "ddp"), ("gloo", 2, "allgather"), ("gloo", 2, "shared_topk"), ("nccl", 1, "ddp"),
            ("nccl", 1, "allgather")]  # fmt: skip
    for backend, world, mode in runs:
        try:
            row = step_row(backend, world, mode, args.steps)
        except Exception as exc:  # report and go on: the other rows still tell something
            row = {"backend": backend, "ranks": world, "route": mode, "error": f"{type(exc).__name__}: {exc}"}
        rows.append({"table": "step", "device_name": name, **row})
        print(f"  step {backend} x{world} {mode:<12} {row.get('step_ms', float('nan')):8.2f} ms  "
              f"syncs {row.get('syncs')} {row.get('error', '')}")  # fmt: skip
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines = [f"Device: {name} (torch {torch.__version__}). Command: `scripts/gpu-check`.", "",
                 "| selection (25M entries, 1%) | ms |", "|---|---|"]  # fmt: skip
        lines += [f"| {r['what']} | {r['ms']:.2f} |" for r in rows if r["table"] == "selection"]
        lines += ["", "| transport | ranks | route | step (ms) | host syncs in a step |", "|---|---|---|---|---|"]
        for r in rows:
            if r["table"] == "step":
                syncs = r.get("error") or (", ".join(r["syncs"]) if r["syncs"] else "none")
                step_ms = f"{r['step_ms']:.2f}" if "step_ms" in r else "-"
                lines.append(f"| {r['backend']} | {r['ranks']} | {r['route']} | {step_ms} | {syncs} |")
        (folder / "results.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {folder / 'results.md'}")
    failed = [r for r in rows if r.get("error") or (r["table"] == "step" and r["route"] != "ddp" and r["syncs"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
