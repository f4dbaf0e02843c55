"""``gradsparse-bench``: does compression pay on your link? Measured, not assumed.

    gradsparse-bench cluster up --ranks 4 --rate 1gbit     # emulated nodes (root), also down/status
    gradsparse-bench run --world-sizes 4 --rates 1gbit --sizes 25e6 --densities 0.001,0.01,0.1
    gradsparse-bench run --loopback ...                      # no root: unshaped 127.0.0.1
    gradsparse-bench run --world-sizes 2 --model resnet,gpt2  # whole training steps of real layouts
    gradsparse-bench select --numel 25e6 --density 0.01     # the selection kernels alone
    gradsparse-bench quality --optimizers adamw,sparse_adamw  # does a sparse run keep the model's quality?
    gradsparse-bench converge --model chargpt --ranks 4 --seeds 0,1,2   # time to quality (root)

``run`` times a full DDP step (backward, hook, wait) of one large parameter on every rank,
for DDP's default allreduce, PyTorch's bf16, fp16 and PowerSGD (rank 1 and 4) hooks and the
sparse hook with each compressor and collective, in the same run. Each configuration is
first checked against a dense allreduce. It reports the median and interquartile range
after warm-up, a time split, bytes per rank (the collectives' accounting and, on the
emulated cluster, the interfaces' own counters), the speedup over DDP's allreduce and the
ratio to the analytic limit (payload bytes at the link rate plus one memory pass). With
``--model`` it times whole training steps of a ResNet-style CNN or a GPT-2-shaped
transformer instead, and reports samples/s. Output goes to JSON lines, CSV, Markdown
tables and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gradsparse.bench.cluster import Cluster, ClusterError, parse_rate
from gradsparse.report import write_csv
from gradsparse.train.tasks import OPTIMIZER_NAMES, TASKS

from .configs import BASELINES
from .converge import SETTINGS, ConvergeError, converge
from .models import MODELS, parameter_count
from .quality import TEXT_MODELS, quality_bench
from .select import select_bench
from .sweep import configs_for, enrich, run_group
from .tables import plots, table

__all__ = ["build_parser", "main"]


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v]


def _slow_rank(text: str) -> Tuple[int, str]:
    rank, _, rate = text.partition(":")
    if not rank.isdigit() or not rate:
        raise ValueError(f"Expected --slow-rank RANK:RATE (e.g. 3:100mbit), but got {text!r}.")
    parse_rate(rate)
    return int(rank), rate


def _names(text: str) -> List[str]:
    return [v for v in text.split(",") if v]


def _seeds(text: str) -> List[int]:
    try:
        return [int(v) for v in _names(text)]
    except ValueError:
        raise ValueError(f"Expected argument `--seeds` to be comma-separated integers, but got {text!r}.") from None


def _add_run(sub: Any) -> None:
    run = sub.add_parser("run", help="sweep configurations and report")
    run.add_argument("--world-sizes", default="4", help="comma-separated numbers of ranks (default 4)")
    run.add_argument("--rates", default="1gbit", help="comma-separated link rates, e.g. 100mbit,1gbit,10gbit")
    run.add_argument("--loopback", action="store_true", help="no cluster: unshaped 127.0.0.1 (no root needed)")
    run.add_argument(
        "--slow-rank",
        action="append",
        default=[],
        metavar="RANK:RATE",
        help="give one rank's link its own rate, e.g. 3:100mbit (a degraded node); repeatable",
    )
    run.add_argument("--sizes", default="1e6,25e6", help="comma-separated parameter sizes in entries")
    run.add_argument(
        "--model",
        default="",
        help=f"comma-separated models among {sorted(MODELS)}: time whole training steps of them (forward, "
        "backward with the hook in DDP's buckets, optimizer step) on synthetic data instead of one parameter "
        "of each --sizes",
    )
    run.add_argument("--densities", default="0.001,0.01,0.1", help="comma-separated densities of the sparse runs")
    run.add_argument("--compressors", default="sampled_topk", help="comma-separated compressors")
    run.add_argument(
        "--collectives",
        default="allgather,split_allgather,recursive_doubling,oktopk,auto",
        help="comma-separated collectives",
    )
    run.add_argument("--baselines", default=",".join(BASELINES), help=f"comma-separated, among {list(BASELINES)}")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    run.add_argument("--iters", type=int, default=5, help="timed steps per configuration")
    run.add_argument("--delay", default=None, help="not available: this kernel has no netem")
    run.add_argument("--out", default="runs/bench", help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradsparse-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cl = sub.add_parser("cluster", help="build or remove the emulated cluster")
    cl.add_argument("action", choices=["up", "down", "status"], help="build, remove, or show it")
    cl.add_argument("--ranks", type=int, default=4, help="number of emulated nodes")
    cl.add_argument("--rate", default="1gbit", help="link rate of every node, e.g. 1gbit")
    cl.add_argument("--delay", default=None, help="not available: this kernel has no netem")
    _add_run(sub)
    sel = sub.add_parser("select", help="time the selection kernels against torch.topk")
    sel.add_argument("--numel", type=float, default=25e6, help="tensor size in entries")
    sel.add_argument("--density", type=float, default=0.01, help="fraction selected")
    sel.add_argument("--out", default=None, help="also write the timings to this JSON file")
    qual = sub.add_parser("quality", help="validation loss of a language model, dense against sparse")
    qual.add_argument(
        "--optimizers",
        default="adamw,sgd,sparse_adamw",
        help="some of adamw, sgd, sparse_adamw, sparse_adamw_global, sparse_adamw_rank_v",
    )
    qual.add_argument(
        "--configs", default="dense,topk:0.1,topk:0.01,topk:0.001,topk:0.01:shared_topk",
        help="'dense', 'none' and COMPRESSOR[:DENSITY[:COLLECTIVE]][+OPTION=VALUE...], comma-separated; "
        "OPTIMIZER/CONFIG runs a config for that optimizer only",
    )  # fmt: skip
    qual.add_argument(
        "--model", default="chargpt", choices=sorted(TEXT_MODELS),
        help="chargpt: the character GPT; gpt2: the GPT-2 layout of `run --model gpt2` on BPE tokens of the text",
    )  # fmt: skip
    qual.add_argument("--steps", type=int, default=600, help="training steps (the same for every run)")
    qual.add_argument("--batch", type=int, default=16, help="sequences of 64 characters (or tokens) per rank and step")
    qual.add_argument("--ranks", type=int, default=2, help="gloo ranks on this machine")
    qual.add_argument("--seeds", default="0", help="seeds of the model, data order and selection, comma-separated")
    qual.add_argument(
        "--lr-warmup", type=float, default=0.1,
        help="the share of the steps over which the one-cycle schedule raises the learning rate",
    )  # fmt: skip
    qual.add_argument("--out", default=None, help="write results.jsonl and results.md here")
    _add_converge(sub)
    return parser


def _add_converge(sub: Any) -> None:
    conv = sub.add_parser("converge", help="time to quality on the emulated cluster, every method and seed")
    conv.add_argument("--model", default="chargpt", choices=sorted(TASKS), help="gradsparse-train's model")
    conv.add_argument(
        "--methods",
        default="dense,bf16,powersgd:1,topk:0.01,topk:0.01@shared_topk,topk:0.01@auto",
        help="gradsparse-train --compare configurations; 'dense' (DDP) is the reference",
    )
    conv.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZER_NAMES), help="gradsparse-train --optimizer")
    conv.add_argument("--ranks", type=int, default=4, help="emulated nodes, one rank each")
    conv.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    conv.add_argument("--steps", type=int, default=300, help="training steps of every run")
    conv.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    conv.add_argument("--batch-size", type=int, default=8, help="per rank")
    conv.add_argument(
        "--setting", default="a100-25gbe", choices=sorted(SETTINGS),
        help="the real step whose ratio of communication to compute the link rate reproduces",
    )  # fmt: skip
    conv.add_argument("--rate", default=None, help="a link rate to use instead of the one derived (e.g. 50mbit)")
    conv.add_argument(
        "--tolerance", type=float, default=None,
        help="also report the time to within this of DDP's final quality: a fraction of its loss (default 0.02), "
        "or of accuracy (default 0.003: 0.3 points)",
    )  # fmt: skip
    conv.add_argument("--calibration-steps", type=int, default=30, help="noop steps that measure the compute step")
    conv.add_argument("--loopback", action="store_true", help="no cluster: unshaped 127.0.0.1 (no root needed)")
    conv.add_argument("--out", default="runs/converge", help="output directory")


def _cluster(args: argparse.Namespace) -> int:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "select":
            return select_bench(int(args.numel), args.density, args.out)
        if args.command == "converge":
            return converge(args)
        if args.command == "quality":
            return quality_bench(
                _names(args.optimizers),
                _names(args.configs),
                args.steps,
                args.batch,
                args.ranks,
                args.out,
                seeds=_seeds(args.seeds),
                lr_warmup=args.lr_warmup,
                model=args.model,
            )
        if getattr(args, "delay", None):
            raise ClusterError("this kernel has no netem, so links emulate bandwidth only; drop --delay")
        if args.command == "cluster":
            return _cluster(args)
        return _run(args)
    except (ClusterError, ConvergeError, ValueError) as exc:
        print(f"gradsparse-bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    baselines = _names(args.baselines)
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; expected some of {list(BASELINES)}")
    worlds = [int(v) for v in args.world_sizes.split(",")]
    rates: List[Optional[str]] = [None] if args.loopback else list(_names(args.rates))
    for rate in rates:
        if rate is not None:
            parse_rate(rate)
    if not args.loopback:
        Cluster.check_privileges()
    slow = tuple(_slow_rank(v) for v in args.slow_rank)
    if slow and args.loopback:
        raise ValueError("--slow-rank shapes the emulated cluster's links; drop --loopback")
    sizes = [int(v) for v in _floats(args.sizes)]
    models = [(name, parameter_count(name)) for name in _names(args.model)]
    densities, compressors = _floats(args.densities), _names(args.compressors)
    configs = configs_for(sizes, densities, compressors, _names(args.collectives), baselines, models)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    for world in worlds:
        for rate in rates:
            group_file = out_dir / f"group-{world}-{rate or 'loopback'}.jsonl"
            group_file.unlink(missing_ok=True)
            run_group(world, rate, configs, args.warmup, args.iters, group_file, slow)
            slow_here = ",".join(f"r{r}:{v}" for r, v in slow if r < world)
            rows += [
                {**json.loads(line), "rate": rate, "slow": slow_here} for line in group_file.read_text().splitlines()
            ]
            group_file.unlink()
    enrich(rows)
    jsonl = out_dir / "results.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_csv(rows, out_dir / "results.csv")
    text = table(rows)
    (out_dir / "results.md").write_text(text + "\n")
    print(text)
    written = [jsonl, out_dir / "results.csv", out_dir / "results.md", *plots(rows, out_dir)]
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
