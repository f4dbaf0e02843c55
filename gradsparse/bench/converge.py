"""``gradsparse-bench converge``: time to quality on an emulated cluster.

``gradsparse-train``'s ranks run inside the emulated cluster (one network namespace per
rank, ``tc tbf`` at the link rate) and train the same model, data and seeds with every
method: DDP, PyTorch's bf16 and PowerSGD hooks, and the sparse hook's configurations. The
table gives each method's final quality (mean and standard deviation over the seeds), the
training time (evaluation excluded) to reach DDP's final quality on the mean curve, and the
speedups; plots show quality against time and against bytes.

The link rate is derived, not chosen: this CPU computes far slower than a GPU, so an
unscaled 1 Gbit/s link would understate the wire's share of a real step. A
:class:`Setting` states a real one (a GPT-2-small step on one GPU per node over Ethernet)
and its ratio of a dense ring allreduce's time to the compute time. The run first measures
this machine's compute step (PyTorch's ``noop`` hook: no communication) on the cluster,
then sets the rate that gives the same ratio for this model, and prints the rate, the
ratio it aimed for and the ratio DDP measured.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from gradsparse.comm import ring_allreduce_bytes
from gradsparse.report import Plot, markdown_table, mean_std, plot_lines
from gradsparse.train.config import parse_config
from gradsparse.train.results import METRIC_LABELS
from gradsparse.train.tasks import get_task

from .cluster import Cluster

__all__ = ["SETTINGS", "ConvergeError", "Setting", "converge", "converge_table", "mean_curves", "time_to"]

logger = logging.getLogger(__name__)


class ConvergeError(RuntimeError):
    """A training run of the comparison failed (its ranks' own errors are above it)."""


@dataclass(frozen=True)
class Setting:
    """A real data-parallel step: ``params`` trained on ``tokens`` per GPU and step at
    ``mfu`` of ``peak_flops``, one GPU per node, ``ranks`` nodes linked at ``link_bits``."""

    name: str
    params: float
    tokens: float
    peak_flops: float
    mfu: float
    link_bits: float
    ranks: int = 4

    @property
    def compute_s(self) -> float:
        """Forward and backward: 6 flops per parameter and token."""
        return 6 * self.params * self.tokens / (self.peak_flops * self.mfu)

    @property
    def allreduce_s(self) -> float:
        """A dense fp32 ring allreduce of every gradient at the link rate."""
        return ring_allreduce_bytes(int(self.params), 4, self.ranks) * 8 / self.link_bits

    @property
    def ratio(self) -> float:
        return self.allreduce_s / self.compute_s

    def describe(self) -> str:
        return (
            f"{self.name}: GPT-2 small ({self.params / 1e6:.0f}M parameters), {self.tokens:.0f} tokens per GPU and "
            f"step at {self.mfu:.0%} of {self.peak_flops / 1e12:.0f} TFLOP/s = {1e3 * self.compute_s:.0f} ms of "
            f"compute; a dense fp32 ring allreduce over {self.ranks} nodes at {self.link_bits / 1e9:.0f} Gbit/s = "
            f"{1e3 * self.allreduce_s:.0f} ms; ratio {self.ratio:.1f}"
        )


_GPT2 = 124e6
_TOKENS = 8 * 1024  # 8 sequences of 1,024 tokens per GPU and step
SETTINGS: Dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("a100-25gbe", _GPT2, _TOKENS, 312e12, 0.4, 25e9),
        Setting("a100-10gbe", _GPT2, _TOKENS, 312e12, 0.4, 10e9),
        Setting("h100-25gbe", _GPT2, _TOKENS, 989e12, 0.4, 25e9),
        Setting("h100-10gbe", _GPT2, _TOKENS, 989e12, 0.4, 10e9),
    )
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _train_ranks(cluster: Optional[Cluster], ranks: int, train_args: Sequence[str], out: Path) -> List[Dict[str, str]]:
    """Run gradsparse-train's ranks (inside the cluster's namespaces, or locally) and read
    back its results.csv."""
    base = [sys.executable, "-m", "gradsparse.train", *train_args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cluster is None:
        procs = [subprocess.Popen([*base, "--ranks", str(ranks)], env=env, stdout=subprocess.DEVNULL)]
    else:
        port = _free_port()
        procs = []
        for rank in range(ranks):
            rank_env = {**env, **cluster.rank_env(rank, port)}
            quiet = subprocess.DEVNULL
            procs.append(subprocess.Popen([*cluster.exec_prefix(rank), *base], env=rank_env, stdout=quiet))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise ConvergeError(f"gradsparse-train's ranks exited with {codes} ({shlex.join(train_args)})")
    with open(out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def mean_curves(rows: Sequence[Dict[str, Any]], metric: str) -> Dict[str, List[Dict[str, float]]]:
    """Per configuration, the seeds' mean at each evaluated step: step, seconds, MB sent,
    the metric."""
    curves: Dict[str, List[Dict[str, float]]] = {}
    for label in dict.fromkeys(str(r["config"]) for r in rows):
        mine = [r for r in rows if r["config"] == label]
        points = []
        for step in sorted({int(r["step"]) for r in mine}):
            at = [r for r in mine if int(r["step"]) == step]
            points.append(
                {key: sum(float(r[key]) for r in at) / len(at) for key in ("step", "seconds", "mb_sent", metric)}
            )
        curves[label] = points
    return curves


def time_to(curve: Sequence[Dict[str, float]], metric: str, target: float, higher: bool) -> Optional[float]:
    """Training seconds at the first evaluation where the mean curve reaches ``target``."""
    for point in curve:
        if (point[metric] >= target) if higher else (point[metric] <= target):
            return point["seconds"]
    return None


def _finals(rows: Sequence[Dict[str, Any]], label: str, metric: str) -> List[float]:
    mine = [r for r in rows if r["config"] == label]
    last = max(int(r["step"]) for r in mine)
    return [float(r[metric]) for r in mine if int(r["step"]) == last]


def _target(dense: float, tolerance: float, higher: bool) -> float:
    """Dense's final quality, loosened by ``tolerance``: points of accuracy, or a relative
    loss (0.02: 2% over dense's loss)."""
    return dense - tolerance if higher else dense * (1 + tolerance)


def converge_table(rows: Sequence[Dict[str, Any]], metric: str, tolerance: float) -> str:
    """Final quality (mean ± std), seconds per step, time to DDP's final quality (and to
    within ``tolerance`` of it), and the speedups over DDP and over the best 16-bit or
    PowerSGD baseline."""
    name, scale = METRIC_LABELS[metric]
    higher = metric != "val_loss"
    curves = mean_curves(rows, metric)
    labels = list(curves)
    dense_label = "dense" if "dense" in curves else labels[0]
    dense = sum(_finals(rows, dense_label, metric)) / len(_finals(rows, dense_label, metric))
    targets = (_target(dense, 0.0, higher), _target(dense, tolerance, higher))
    reach = {label: [time_to(curves[label], metric, t, higher) for t in targets] for label in labels}
    baselines = [lb for lb in labels if lb.split(":")[0] in ("bf16", "fp16", "powersgd")]
    within = f"{100 * tolerance:.0f}%" if not higher else f"{scale * tolerance:.1f} points"
    header = [
        "method", f"final {name} (mean ± std)", "s per step", "MB sent per step",
        "time to DDP's final", "vs DDP", "vs best 16-bit/PowerSGD", f"time to within {within}", "vs DDP",
    ]  # fmt: skip
    lines = []
    for label in labels:
        finals = _finals(rows, label, metric)
        mean, std = mean_std(finals)
        last = curves[label][-1]
        cells = [label, f"{scale * mean:.3f} ± {scale * std:.3f}", f"{last['seconds'] / last['step']:.3f}"]
        cells.append(f"{last['mb_sent'] / last['step']:.3f}")
        for i in (0, 1):
            mine, ddp = reach[label][i], reach[dense_label][i]
            cells.append("not reached" if mine is None else f"{mine:.1f} s")
            cells.append("-" if mine is None or ddp is None or label == dense_label else f"{ddp / mine:.2f}x")
            if i == 0:
                best = [t for t in (reach[b][0] for b in baselines) if t is not None]
                fine = mine is not None and best and label not in baselines and label != dense_label
                cells.append(f"{min(best) / mine:.2f}x" if fine and mine else "-")
        lines.append(cells)
    return markdown_table(header, lines)


def _plots(metric: str) -> List[Plot]:
    label = METRIC_LABELS[metric][0]
    return [
        Plot("quality_vs_seconds", "seconds", "shown", "training time (s)", label, lambda r: r["config"]),
        Plot("quality_vs_mb", "mb_sent", "shown", "MB sent per rank", label, lambda r: r["config"], xlog=True),
    ]


def _calibrate(cluster: Optional[Cluster], ranks: int, common: Sequence[str], steps: int) -> float:
    """Seconds per training step with no communication at all (PyTorch's noop hook)."""
    with tempfile.TemporaryDirectory(prefix="gradsparse-converge-") as tmp:
        rows = _train_ranks(cluster, ranks, [*common, "--compare", "noop", "--max-steps", str(steps)], Path(tmp))
    last = rows[-1]
    return float(last["seconds"]) / float(last["step"])


def converge(args: Any) -> int:
    """The ``converge`` subcommand (arguments from :mod:`gradsparse.bench.bench_cli`)."""
    task = get_task(args.model)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        parse_config(method)  # fails early, naming the bad one
    setting = SETTINGS[args.setting]
    common = ["--model", args.model, "--optimizer", args.optimizer, "--batch-size", str(args.batch_size)]
    common += ["--timeout", "900"]
    if not args.loopback:
        Cluster.check_privileges()
    params = sum(p.numel() for p in task.build().parameters())
    fast = None if args.loopback else Cluster(args.ranks, "10gbit")
    if fast is not None:
        fast.up()
    try:
        compute = _calibrate(fast, args.ranks, common, args.calibration_steps)
    finally:
        if fast is not None:
            fast.down()
    dense_bytes = ring_allreduce_bytes(params, 4, args.ranks)
    bits = dense_bytes * 8 / (setting.ratio * compute)
    rate = args.rate or f"{max(int(bits / 1e3), 100)}kbit"
    print(setting.describe())
    print(
        f"this machine: {args.model} ({params / 1e6:.2f}M parameters), {1e3 * compute:.0f} ms per step without "
        f"communication on {args.ranks} ranks; a dense allreduce is {dense_bytes / 1e6:.2f} MB per rank, so "
        f"ratio {setting.ratio:.1f} needs a link of {bits / 1e6:.1f} Mbit/s"
        + (f"; --rate {args.rate} given instead" if args.rate else "")
        + (" (--loopback: no link emulated)" if args.loopback else ""),
        flush=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_args = [*common, "--compare", ",".join(methods), "--seeds", args.seeds, "--max-steps", str(args.steps)]
    train_args += ["--eval-every", str(args.eval_every)]
    cluster = None if args.loopback else Cluster(args.ranks, rate)
    if cluster is not None:
        cluster.up()
    try:
        rows = _train_ranks(cluster, args.ranks, train_args, out / "train")
    finally:
        if cluster is not None:
            cluster.down()
    return _report(rows, task.metric, args, rate, setting, compute, out)


def _report(
    rows: List[Dict[str, Any]], metric: str, args: Any, rate: str, setting: Setting, compute: float, out: Path
) -> int:
    curves = mean_curves(rows, metric)
    ddp = curves.get("dense")
    measured = (ddp[-1]["seconds"] / ddp[-1]["step"] - compute) / compute if ddp else float("nan")
    tolerance = args.tolerance if args.tolerance is not None else (0.02 if metric == "val_loss" else 0.003)
    table = converge_table(rows, metric, tolerance)
    head = (
        f"{args.model}, {args.optimizer}, {args.ranks} ranks, {args.steps} steps, seeds {args.seeds}, "
        f"link {'loopback' if args.loopback else rate}; setting {setting.name} (ratio {setting.ratio:.1f}); "
        f"compute {1e3 * compute:.0f} ms per step; DDP's measured ratio of communication to compute {measured:.1f}"
    )
    print("\n" + head + "\n\n" + table)
    (out / "results.md").write_text(head + "\n\n" + table + "\n")
    meta: Dict[str, Any] = {
        "command": "gradsparse-bench " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["converge"] else None
    }
    meta.update({"model": args.model, "optimizer": args.optimizer, "ranks": args.ranks, "steps": args.steps})
    meta.update({"seeds": args.seeds, "rate": None if args.loopback else rate, "setting": setting.name})
    meta.update({"setting_ratio": setting.ratio, "compute_s": compute, "measured_ratio": measured})
    (out / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    scale = METRIC_LABELS[metric][1]
    plotted = [{**p, "config": label, "shown": scale * p[metric]} for label, c in curves.items() for p in c]
    paths = plot_lines(plotted, _plots(metric), out)
    print("\nwrote " + ", ".join(str(p) for p in [out / "results.md", out / "run.json", out / "train", *paths]))
    return 0
