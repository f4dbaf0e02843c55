"""``gradsparse-bench``: does compression pay on your link? Measured, not assumed.

    gradsparse-bench cluster up --ranks 4 --rate 1gbit     # emulated nodes (root), also down/status
    gradsparse-bench run --world-sizes 4 --rates 1gbit --sizes 25e6 --densities 0.001,0.01,0.1
    gradsparse-bench run --loopback ...                      # no root: unshaped 127.0.0.1
    gradsparse-bench select --numel 25e6 --density 0.01     # the selection kernels alone

``run`` times a full DDP step (backward, hook, wait) of one large parameter on every rank,
for DDP's default allreduce, PyTorch's fp16 and PowerSGD (rank 1 and 4) hooks and the
sparse hook with each compressor and collective, in the same run. Each configuration is
first checked against a dense allreduce. It reports the median and interquartile range
after warm-up, a time split, bytes per rank (the collectives' accounting and, on the
emulated cluster, the interfaces' own counters), the speedup over DDP's allreduce and the
ratio to the analytic limit (payload bytes at the link rate plus one memory pass). Output
goes to JSON lines, CSV, a Markdown table and PNG plots.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import functools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from gradsparse._timing import median_seconds
from gradsparse.cluster import Cluster, ClusterError, parse_rate

__all__ = ["main"]

BASELINES = ("ddp", "fp16", "powersgd1", "powersgd4")


@dataclass(frozen=True)
class Config:
    method: str  # a baseline, or "sparse"
    numel: int
    density: float = 1.0
    compressor: str = ""
    collective: str = ""

    @property
    def label(self) -> str:
        if self.method != "sparse":
            return self.method
        return f"{self.compressor}/{self.collective}"


# The worker: one rank ---------------------------------------------------------------------


def _shape(numel: int) -> tuple:
    return (numel // 1000, 1000) if numel % 1000 == 0 and numel >= 1000 else (1, numel)


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path) as fh:
        return sum(1 for _ in fh)


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


class _OneParameter(torch.nn.Module):
    """One large parameter; its gradient is the one given to forward()."""

    def __init__(self, shape: tuple) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(shape))

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        return _Inject.apply(self.weight, grad)


def _bench_one(cfg: Config, warmup: int, iters: int, interface: Optional[str]) -> Dict[str, Any]:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    import gradsparse as gs
    from gradsparse import compressors

    rank, world = dist.get_rank(), dist.get_world_size()
    shape = _shape(cfg.numel)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1234 + rank))

    def make() -> Any:
        module = _OneParameter(shape)
        ddp = nn.parallel.DistributedDataParallel(
            module, bucket_cap_mb=cfg.numel * 4 / 2**20 + 1, gradient_as_bucket_view=True
        )
        state = None
        if cfg.method == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif cfg.method.startswith("powersgd"):
            ps = powersgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=int(cfg.method[-1]),
                start_powerSGD_iter=2,
                min_compression_rate=0.0,
                use_error_feedback=True,
                warm_start=True,
            )
            ddp.register_comm_hook(ps, powersgd.powerSGD_hook)
        elif cfg.method == "sparse":
            state = gs.register_sparse_hook(
                ddp, cfg.compressor, density=cfg.density, collective=cfg.collective, min_compress_numel=0
            )
        return module, ddp, state

    def step(module: Any, ddp: Any) -> None:
        ddp(grad).backward()  # through DDP's forward, so that its reducer runs

    # Correctness, on a fresh state (no residual yet) --------------------------------------
    module, ddp, state = make()
    step(module, ddp)
    result = module.weight.grad.reshape(-1).clone()
    dense = grad.reshape(-1).clone()
    dist.all_reduce(dense)
    dense /= world
    rel_error = float(torch.linalg.vector_norm(result - dense) / torch.linalg.vector_norm(dense))
    check = "exact"
    if cfg.method == "ddp":
        ok = bool(torch.allclose(result, dense, rtol=1e-5, atol=1e-6))
    elif cfg.method == "fp16":
        ok = bool(torch.allclose(result, dense, rtol=1e-2, atol=1e-2))
    elif cfg.method.startswith("powersgd"):
        ok, check = True, "lossy (first steps are vanilla allreduce)"
    else:
        local = compressors.build(cfg.compressor, density=cfg.density).compress(grad.reshape(-1)).to_dense()
        dist.all_reduce(local)
        local /= world
        if cfg.collective == "oktopk":  # keeps the global top-k: a subset of the exact sparse sum
            chosen = result != 0
            ok, check = bool(torch.allclose(result[chosen], local[chosen], rtol=1e-5, atol=1e-6)), "subset"
        elif cfg.collective == "auto":  # auto may have sent this bucket dense
            sparse_ok = bool(torch.allclose(result, local, rtol=1e-5, atol=1e-6))
            dense_ok = bool(torch.allclose(result, dense, rtol=1e-5, atol=1e-6))
            ok, check = sparse_ok or dense_ok, "exact (" + ("sparse" if sparse_ok else "dense") + ")"
        else:
            ok = bool(torch.allclose(result, local, rtol=1e-5, atol=1e-6))
    del module, ddp, state

    # Timing ------------------------------------------------------------------------------
    module, ddp, state = make()
    times, split, sent, wire = [], {"compress_s": 0.0, "communicate_s": 0.0, "decompress_s": 0.0}, [], []
    for i in range(warmup + iters):
        before = state.stats() if state is not None else None
        tx = _wire_counters(interface)
        dist.barrier()
        start = time.perf_counter()
        step(module, ddp)
        elapsed = time.perf_counter() - start
        tx_after = _wire_counters(interface)
        if i < warmup:
            continue
        times.append(elapsed)
        if tx is not None and tx_after is not None:
            wire.append(tx_after - tx)
        if state is not None and before is not None:
            after = state.stats()
            for key in split:
                split[key] += (after[key] - before[key]) / iters
            sent.append(after["bytes_sent"] - before["bytes_sent"] + after["control_bytes"] - before["control_bytes"])
    # The slowest rank decides the step: take the max over ranks of each statistic.
    summary = torch.tensor(
        [statistics.median(times), _quantile(times, 0.25), _quantile(times, 0.75)], dtype=torch.float64
    )
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    ok_all = torch.tensor([int(ok)])
    dist.all_reduce(ok_all, op=dist.ReduceOp.MIN)
    p = world
    n4 = 4 * cfg.numel
    rows, cols = shape
    formula = {
        "ddp": 2 * (p - 1) / p * n4,
        "fp16": 2 * (p - 1) / p * n4 / 2,
        "powersgd1": 2 * (p - 1) / p * 4 * (rows + cols) * 1,
        "powersgd4": 2 * (p - 1) / p * 4 * (rows + cols) * 4,
    }
    accounted = statistics.median(sent) if sent else formula.get(cfg.method, 0.0)
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
        "bytes_per_rank": accounted,
        "wire_bytes_per_rank": statistics.median(wire) if wire else None,
        "pass_s": _pass_seconds(cfg.numel),
        **split,
    }


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _worker(spec_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.FileStore(spec["store_file"], world)  # no listening socket for the rendezvous
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    for raw in spec["configs"]:
        row = _bench_one(Config(**raw), spec["warmup"], spec["iters"], spec.get("interface"))
        if dist.get_rank() == 0:
            with open(spec["out"], "a") as fh:
                fh.write(json.dumps(row) + "\n")
    dist.barrier()
    dist.destroy_process_group()


# The parent: sweeps, clusters, reports ----------------------------------------------------------


def _configs(args: argparse.Namespace) -> List[Config]:
    out: List[Config] = []
    for numel in args.sizes:
        out += [Config(b, numel) for b in args.baselines]
        for density in args.densities:
            for compressor in args.compressors:
                out += [Config("sparse", numel, density, compressor, c) for c in args.collectives]
    return out


def _run_group(world: int, rate: Optional[str], configs: List[Config], args: argparse.Namespace, out: Path) -> None:
    """All configurations at one world size and link rate, on one cluster."""
    from tqdm import tqdm

    cluster = None if rate is None else Cluster(world, rate)
    spec = {"configs": [c.__dict__ for c in configs], "warmup": args.warmup, "iters": args.iters, "out": str(out)}
    procs: List[subprocess.Popen] = []
    store_dirs: List[Path] = []

    def teardown(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for path in store_dirs:
            shutil.rmtree(path, ignore_errors=True)
        if cluster is not None:
            cluster.down()

    atexit.register(teardown)

    def on_term(*_: object) -> None:
        teardown()
        sys.exit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        if cluster is not None:
            cluster.up()
            spec["interface"] = cluster.interface
        # The ranks meet through a file, not a TCPStore (whose server listens on every
        # interface); gloo binds to lo or to the rank's veth. Nothing listens anywhere else.
        store_dir = Path(tempfile.mkdtemp(prefix="gsbench-store-"))
        spec["store_file"] = str(store_dir / "store")
        store_dirs.append(store_dir)
        spec_file = Path(tempfile.mkstemp(prefix="gsbench-", suffix=".json")[1])
        spec_file.write_text(json.dumps(spec))
        before = _lines(out)
        for rank in range(world):
            if cluster is not None:
                # inside the rank's namespace: the store and gloo see only its lo and veth
                env = {**os.environ, **cluster.rank_env(rank), "OMP_NUM_THREADS": "1"}
                cmd = [*cluster.exec_prefix(rank), sys.executable, "-m", "gradsparse.bench", "worker", str(spec_file)]
            else:
                env = {
                    **os.environ,
                    "GLOO_SOCKET_IFNAME": "lo",
                    "RANK": str(rank),
                    "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(rank),
                    "OMP_NUM_THREADS": "1",
                }
                cmd = [sys.executable, "-m", "gradsparse.bench", "worker", str(spec_file)]
            procs.append(subprocess.Popen(cmd, env=env))
        desc = f"P={world} {rate or 'loopback'}"
        with tqdm(total=len(configs), desc=desc, unit="cfg", disable=not sys.stderr.isatty()) as bar:
            done = 0
            while any(p.poll() is None for p in procs):
                time.sleep(0.5)
                now = _lines(out) - before
                bar.update(now - done)
                done = now
                failed = [p for p in procs if p.poll() not in (None, 0)]
                if failed:
                    raise RuntimeError(f"a benchmark rank exited with code {failed[0].returncode}")
        spec_file.unlink()
    finally:
        teardown()
        signal.signal(signal.SIGTERM, previous)
        atexit.unregister(teardown)


def _enrich(rows: List[Dict[str, Any]]) -> None:
    """Speedup over DDP's allreduce in the same group, and the ratio to the analytic limit."""
    for row in rows:
        key = (row["numel"], row["world"], row.get("rate"))
        base = next((r for r in rows if r["method"] == "ddp" and (r["numel"], r["world"], r.get("rate")) == key), None)
        row["speedup_vs_ddp"] = base["median_s"] / row["median_s"] if base else None
        bps = parse_rate(row["rate"]) if row.get("rate") else None
        if bps is not None:
            row["limit_s"] = row["bytes_per_rank"] * 8 / bps + row["pass_s"]
            row["ratio_to_limit"] = row["median_s"] / row["limit_s"]
        else:
            row["limit_s"] = row["ratio_to_limit"] = None


def _markdown(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| P | link | size | method | density | median ms (IQR) | select / comm / decode ms | MB per rank "
        "| wire MB | speedup vs DDP | x limit | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = (
            f"{1e3 * r['compress_s']:.1f} / {1e3 * r['communicate_s']:.1f} / {1e3 * r['decompress_s']:.1f}"
            if r["method"] == "sparse"
            else "-"
        )
        wire = f"{r['wire_bytes_per_rank'] / 1e6:.2f}" if r.get("wire_bytes_per_rank") else "-"
        limit = f"{r['ratio_to_limit']:.2f}" if r.get("ratio_to_limit") else "-"
        speed = f"{r['speedup_vs_ddp']:.1f}x" if r.get("speedup_vs_ddp") else "-"
        density = f"{r['density']:g}" if r["method"] == "sparse" else "-"
        lines.append(
            f"| {r['world']} | {r.get('rate') or 'loopback'} | {r['numel'] / 1e6:g}M | {r['label']} | {density} "
            f"| {1e3 * r['median_s']:.1f} ({1e3 * r['q1_s']:.1f}-{1e3 * r['q3_s']:.1f}) | {split} "
            f"| {r['bytes_per_rank'] / 1e6:.2f} | {wire} | {speed} | {limit} "
            f"| {'ok' if r['correct'] else 'FAILED'} ({r['check']}) |"
        )
    return "\n".join(lines)


def _plots(rows: List[Dict[str, Any]], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sparse = [r for r in rows if r["method"] == "sparse"]
    specs = [
        (
            "time_vs_density",
            "density",
            "median_s",
            "step time (s)",
            lambda r: (r["label"], r["numel"], r["world"], r.get("rate")),
        ),
        (
            "bytes_vs_world",
            "world",
            "bytes_per_rank",
            "bytes per rank",
            lambda r: (r["label"], r["numel"], r["density"], r.get("rate")),
        ),
        (
            "speedup_vs_rate",
            "rate_bps",
            "speedup_vs_ddp",
            "speedup over DDP allreduce",
            lambda r: (r["label"], r["numel"], r["density"], r["world"]),
        ),
    ]
    for r in rows:
        r["rate_bps"] = parse_rate(r["rate"]) if r.get("rate") else None
    for name, xkey, ykey, ylabel, group in specs:
        series: Dict[Any, List[Dict[str, Any]]] = {}
        for r in sparse:
            if r.get(xkey) is not None and r.get(ykey) is not None:
                series.setdefault(group(r), []).append(r)
        useful = {k: v for k, v in series.items() if len({p[xkey] for p in v}) > 1}
        if not useful:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, points in sorted(useful.items(), key=lambda kv: str(kv[0])):
            points.sort(key=lambda p: p[xkey])
            ax.plot([p[xkey] for p in points], [p[ykey] for p in points], marker="o", label=" ".join(map(str, key)))
        ax.set_xscale("log" if xkey != "world" else "linear")
        ax.set_yscale("log")
        ax.set_xlabel(xkey)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _select_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from gradsparse import compressors
    from gradsparse.compressors import CompressorState

    torch.set_num_threads(1)
    n, density = int(args.numel), args.density
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    k = compressors.k_for_density(density, n)
    buf = torch.empty_like(x)

    one_pass = median_seconds(lambda: torch.abs(x, out=buf))
    rows: List[tuple] = [("one read+write pass (torch.abs out=)", one_pass, None)]
    rows.append(("torch.topk", median_seconds(lambda: torch.topk(x.abs(), k), repeats=1), k))
    rows.append(
        ("np.argpartition", median_seconds(lambda: np.argpartition(np.abs(x.numpy()), n - k)[n - k :], repeats=1), k)
    )
    for name in ("topk", "sampled_topk"):
        comp = compressors.build(name, density=density)
        state = CompressorState()
        count = comp.compress(x, state).count
        seconds = median_seconds(functools.partial(comp.compress, x, state))
        rows.append((f"gradsparse {name}", seconds, count))
    print(f"selection of {density:g} of {n:,} fp32 entries (k = {k:,}), one thread")
    print(f"{'method':<38}{'ms':>9}{'x pass':>9}{'vs torch.topk':>15}{'count/k':>10}")
    topk_time = rows[1][1]
    for name, seconds, count in rows:
        ratio = f"{count / k:.3f}" if count else "-"
        print(f"{name:<38}{1e3 * seconds:>9.1f}{seconds / one_pass:>9.1f}{topk_time / seconds:>14.1f}x{ratio:>10}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump([{"method": r[0], "seconds": r[1], "count": r[2], "k": k} for r in rows], fh, indent=1)
    return 0


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradsparse-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cl = sub.add_parser("cluster", help="build or remove the emulated cluster")
    cl.add_argument("action", choices=["up", "down", "status"])
    cl.add_argument("--ranks", type=int, default=4)
    cl.add_argument("--rate", default="1gbit")
    cl.add_argument("--delay", default=None, help="not available: this kernel has no netem")
    run = sub.add_parser("run", help="sweep configurations and report")
    run.add_argument("--world-sizes", default="4")
    run.add_argument("--rates", default="1gbit", help="comma-separated link rates, e.g. 100mbit,1gbit,10gbit")
    run.add_argument("--loopback", action="store_true", help="no cluster: unshaped 127.0.0.1 (no root needed)")
    run.add_argument("--sizes", default="1e6,25e6")
    run.add_argument("--densities", default="0.001,0.01,0.1")
    run.add_argument("--compressors", default="sampled_topk")
    run.add_argument("--collectives", default="allgather,split_allgather,recursive_doubling,oktopk,auto")
    run.add_argument("--baselines", default=",".join(BASELINES))
    run.add_argument("--warmup", type=int, default=2)
    run.add_argument("--iters", type=int, default=5)
    run.add_argument("--delay", default=None, help="not available: this kernel has no netem")
    run.add_argument("--out", default="runs/bench")
    sel = sub.add_parser("select", help="time the selection kernels against torch.topk")
    sel.add_argument("--numel", type=float, default=25e6)
    sel.add_argument("--density", type=float, default=0.01)
    sel.add_argument("--out", default=None)
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("spec")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "worker":
            _worker(args.spec)
            return 0
        if args.command == "select":
            return _select_bench(args)
        if getattr(args, "delay", None):
            raise ClusterError("this kernel has no netem, so links emulate bandwidth only; drop --delay")
        if args.command == "cluster":
            cluster = Cluster(args.ranks, args.rate)
            if args.action == "up":
                cluster.up()
                print(f"cluster up: {args.ranks} namespaces {cluster.namespace(0)}.. at {args.rate}")
            elif args.action == "down":
                Cluster.check_privileges()
                cluster.down()
                print("cluster down")
            else:
                for row in cluster.status() or [{"namespace": "(none)", "address": "", "qdisc": ""}]:
                    print(f"{row['namespace']:<10}{row['address']:<14}{row['qdisc']}")
            return 0
        return _run(args)
    except (ClusterError, ValueError) as exc:
        print(f"gradsparse-bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    args.sizes = [int(v) for v in _floats(args.sizes)]
    args.densities = _floats(args.densities)
    args.compressors = [c for c in args.compressors.split(",") if c]
    args.collectives = [c for c in args.collectives.split(",") if c]
    args.baselines = [b for b in args.baselines.split(",") if b]
    for b in args.baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; expected some of {list(BASELINES)}")
    worlds = [int(v) for v in args.world_sizes.split(",")]
    rates: List[Optional[str]] = [None] if args.loopback else [r for r in args.rates.split(",") if r]
    for rate in rates:
        if rate is not None:
            parse_rate(rate)
    if not args.loopback:
        Cluster.check_privileges()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "results.jsonl"
    jsonl.unlink(missing_ok=True)
    configs = _configs(args)
    rows: List[Dict[str, Any]] = []
    for world in worlds:
        for rate in rates:
            group_file = out_dir / f"group-{world}-{rate or 'loopback'}.jsonl"
            group_file.unlink(missing_ok=True)
            _run_group(world, rate, configs, args, group_file)
            for line in group_file.read_text().splitlines():
                row = json.loads(line)
                row["rate"] = rate
                rows.append(row)
            group_file.unlink()
    _enrich(rows)
    with open(jsonl, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    table = _markdown(rows)
    (out_dir / "results.md").write_text(table + "\n")
    plots = _plots(rows, out_dir)
    print(table)
    print("\nwrote " + ", ".join(str(p) for p in [jsonl, out_dir / "results.csv", out_dir / "results.md", *plots]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
