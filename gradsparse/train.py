"""``gradsparse-train``: data-parallel training with sparse communication, and comparisons.

Runs on its own (``--ranks N`` starts N local ranks through torch's elastic launcher, like
torchrun) or as one rank under an existing torchrun / mpirun / srun launch. It trains on
scikit-learn's bundled handwritten digits (no download): a small CNN by default, or a wide
MLP with a few million parameters (``--model mlp``) where bandwidth matters.

``--compare "dense,topk:0.01,topk:0.001+noef"`` trains several configurations on the same
data and seeds and writes a table (Markdown and CSV) and plots. A configuration is
``NAME[:VALUE][+noef]``: VALUE is the density for topk / sampled_topk / randomk, the
threshold for threshold and alpha for variance; ``+noef`` turns error feedback off;
``dense`` is DDP's own allreduce.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from gradsparse import compressors
from gradsparse.comm import available as available_collectives
from gradsparse.hooks import SparseHookState, register_sparse_hook
from gradsparse.masking import WeightMasker

__all__ = ["RunConfig", "build_model", "load_digits_split", "main", "parse_config", "train"]

logger = logging.getLogger("gradsparse.train")

_VALUE_PARAM = {
    "topk": "density",
    "sampled_topk": "density",
    "randomk": "density",
    "threshold": "threshold",
    "variance": "alpha",
}
_CHECKPOINT_FORMAT = "gradsparse-train/2"


class UsageError(ValueError):
    """Bad command-line input: reported as one line, without a traceback."""


@dataclass(frozen=True)
class RunConfig:
    """One configuration of a comparison."""

    label: str
    compressor: Optional[str]  # None: DDP's own dense allreduce
    params: Dict[str, float] = field(default_factory=dict)
    error_feedback: bool = True


def parse_config(spec: str) -> RunConfig:
    """``NAME[:VALUE][+noef]`` -> RunConfig, validated by building the compressor."""
    label = spec.strip()
    body, _, flag = label.partition("+")
    if flag not in ("", "noef"):
        raise UsageError(f"configuration {label!r}: unknown flag '+{flag}' (only '+noef' is allowed)")
    name, _, value = body.partition(":")
    if name == "dense":
        if value or flag:
            raise UsageError(f"configuration {label!r}: 'dense' takes no value or flag")
        return RunConfig(label, None)
    if name not in compressors.available():
        raise UsageError(
            f"configuration {label!r}: unknown compressor {name!r}; expected one of "
            f"{['dense', *compressors.available()]}"
        )
    params: Dict[str, float] = {}
    if value:
        if name not in _VALUE_PARAM:
            raise UsageError(f"configuration {label!r}: {name!r} takes no value")
        try:
            params[_VALUE_PARAM[name]] = float(value)
        except ValueError:
            raise UsageError(f"configuration {label!r}: {value!r} is not a number") from None
    try:
        compressors.build(name, **params)
    except ValueError as exc:
        raise UsageError(f"configuration {label!r}: {exc}") from None
    return RunConfig(label, name, params, error_feedback=flag != "noef")


# Data and models ---------------------------------------------------------------------


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> Tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits (1,797 images), standardised, with a fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("the digits data set needs scikit-learn: pip install 'gradsparse[train]'") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train_idx = order[:n_test], order[n_test:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return x[train_idx], y[train_idx], x[test], y[test]


def build_model(name: str) -> nn.Module:
    if name == "cnn":  # ~150k parameters
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    if name == "mlp":  # ~4.3M parameters: communication-heavy
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 2048),
            nn.ReLU(),
            nn.Linear(2048, 2048),
            nn.ReLU(),
            nn.Linear(2048, 10),
        )
    raise UsageError(f"unknown model {name!r}; expected one of ['cnn', 'mlp']")


# One configuration on one rank -------------------------------------------------------


def _checkpoint_path(out: Path, config: RunConfig, seed: int) -> Path:
    safe = config.label.replace(":", "_").replace("+", "_")
    return out / "checkpoints" / f"{safe}-seed{seed}.pt"


def _save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves half a checkpoint


def _load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (nothing is unpickled); a clear error if not."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from None


def load_checkpoint(path: Path, model_name: str) -> Dict[str, Any]:
    """Load with ``weights_only=True`` and check that it belongs to this model."""
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a gradsparse-train checkpoint")
    if ckpt.get("model_name") != model_name:
        raise UsageError(
            f"checkpoint {path} was saved for model {ckpt.get('model_name')!r}, not {model_name!r}; "
            f"pass --model {ckpt.get('model_name')} or start without --resume"
        )
    return ckpt


def train(config: RunConfig, args: argparse.Namespace, seed: int) -> List[Dict[str, Any]]:
    """Train one configuration on this rank; return per-epoch records (same on all ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    torch.manual_seed(seed)
    model = build_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    ddp = nn.parallel.DistributedDataParallel(model)
    masker: Optional[WeightMasker] = None
    if args.mask_sparsity:
        steps_total = args.epochs * math.ceil(len(y_train) / (args.batch_size * world))
        masker = WeightMasker(
            model,
            args.mask_sparsity,
            criterion=args.mask_criterion,
            schedule="gradual",
            end_step=steps_total // 2,
            frequency=max(1, steps_total // 40),
            regrow_every=max(1, steps_total // 20),
        )
    state: Optional[SparseHookState] = None
    if config.compressor is not None:
        state = register_sparse_hook(
            ddp,
            compressor=config.compressor,
            **config.params,
            error_feedback=config.error_feedback,
            collective=args.collective,
            start_step=args.warmup_steps,
            masker=masker,
        )
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    steps_per_epoch = math.ceil(len(y_train) / (args.batch_size * world))
    start_epoch, start_step, records = 0, 0, []
    resumed_loss = torch.zeros(2)
    ckpt_path = _checkpoint_path(Path(args.out), config, seed)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # an elastic restart resumes
    if (args.resume or restarted) and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, args.model)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        own = _load_own_state(ckpt_path, ckpt, rank, world)  # residuals differ by rank
        if state is not None:
            state.load_state_dict(own["hook"])
        resumed_loss = own["epoch_loss"]
        if masker is not None:
            if ckpt.get("masks") is None:
                raise UsageError(f"checkpoint {ckpt_path} has no masks, but --mask-sparsity is set")
            masker.load_state_dict(ckpt["masks"])
        start_epoch, start_step, records = ckpt["epoch"], ckpt["step"], list(ckpt["records"])
        logger.info("resumed %s (seed %d) at epoch %d, step %d", config.label, seed, start_epoch, start_step)
    writer = _tensorboard(args, config, seed) if rank == 0 else None
    progress = _progress(rank, args.epochs * steps_per_epoch, config.label, start_epoch * steps_per_epoch + start_step)
    started = time.perf_counter() - (records[-1]["seconds"] if records else 0.0)
    global_step = start_epoch * steps_per_epoch + start_step
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        mine = order[rank::world]
        ddp.train()
        total = resumed_loss.clone() if epoch == start_epoch else torch.zeros(2)
        for step in range(start_step if epoch == start_epoch else 0, steps_per_epoch):
            idx = mine[step * args.batch_size : (step + 1) * args.batch_size]
            opt.zero_grad()
            if idx.numel():
                loss = nn.functional.cross_entropy(ddp(x_train[idx]), y_train[idx])
            else:  # an uneven last batch: join the collective with a zero gradient
                loss = ddp(x_train[:1]).sum() * 0.0
            loss.backward()
            opt.step()
            if masker is not None:
                masker.step(opt)
            total += torch.tensor([float(loss.detach()) * idx.numel(), idx.numel()])
            global_step += 1
            progress.update(1)
            # (the last step of an epoch is checkpointed below, with the epoch's record)
            if args.checkpoint_every and global_step % args.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                _checkpoint(ckpt_path, rank, model, opt, state, masker, args, config, epoch, step + 1, records, total)
        dist.all_reduce(total)
        record = _evaluate(model, x_test, y_test, epoch, total, n_params, world, global_step, state, started)
        record["weight_sparsity"] = masker.global_sparsity() if masker is not None else 0.0
        records.append(record)
        if writer is not None:
            for key in ("loss", "test_accuracy", "mb_sent", "compression_ratio", "density", "residual_norm"):
                writer.add_scalar(f"{config.label}/{key}", record[key], epoch + 1)
        if args.checkpoint_every:
            _checkpoint(ckpt_path, rank, model, opt, state, masker, args, config, epoch + 1, 0, records, torch.zeros(2))
    progress.close()
    if writer is not None:
        writer.close()
    return records


def _evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    total: torch.Tensor,
    n_params: int,
    world: int,
    steps: int,
    state: Optional[SparseHookState],
    started: float,
) -> Dict[str, Any]:
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    dense_bytes = 2 * (world - 1) * 4 * n_params * steps // max(world, 1)
    stats = state.stats() if state is not None else {}
    sent = stats.get("bytes_sent", dense_bytes)
    return {
        "epoch": epoch + 1,
        "loss": float(total[0] / max(float(total[1]), 1.0)),
        "test_accuracy": accuracy,
        "mb_sent": sent / 1e6,
        "compression_ratio": dense_bytes / sent if sent else float("inf"),
        "density": stats.get("density", 1.0),
        "residual_norm": stats.get("residual_norm", 0.0),
        "seconds": time.perf_counter() - started,
    }


def _rank_file(path: Path, rank: int, epoch: int, step: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}.e{epoch}s{step}.pt")


def _checkpoint(
    path: Path,
    rank: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    state: Optional[SparseHookState],
    masker: Optional[WeightMasker],
    args: argparse.Namespace,
    config: RunConfig,
    epoch: int,
    step: int,
    records: List[Dict[str, Any]],
    epoch_loss: torch.Tensor,
) -> None:
    """Write a checkpoint that a crash at any moment leaves consistent.

    Residuals (and this epoch's partial loss sums) differ by rank: ranks > 0 first write
    their own hook state to a file named by
    the position (epoch, step). Rank 0 then writes the main file (model, optimizer and masks,
    identical everywhere, with its own hook state), which is the commit point: it names the
    position, so a restart reads either the old checkpoint with the old per-rank files or the
    new one with the new files, never a mix. Older per-rank files go only after the commit.
    """
    hook = state.state_dict() if state is not None else None
    if rank != 0:
        mine = {"hook": hook, "epoch_loss": epoch_loss, "epoch": epoch, "step": step}
        _save_checkpoint(_rank_file(path, rank, epoch, step), mine)
    dist.barrier()  # every rank's state is on disk before the main file names it
    if rank == 0:
        _save_checkpoint(
            path,
            {
                "format": _CHECKPOINT_FORMAT,
                "model_name": args.model,
                "config": config.label,
                "world_size": dist.get_world_size(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "hook": hook,
                "epoch_loss": epoch_loss,
                "masks": masker.state_dict() if masker is not None else None,
                "epoch": epoch,
                "step": step,
                "records": records,
            },
        )
    dist.barrier()  # committed
    if rank != 0:
        current = _rank_file(path, rank, epoch, step)
        for old in path.parent.glob(f"{path.stem}.rank{rank}.e*.pt"):
            if old != current:
                old.unlink(missing_ok=True)


def _load_own_state(path: Path, ckpt: Dict[str, Any], rank: int, world: int) -> Dict[str, Any]:
    """This rank's part (``hook``, ``epoch_loss``) of the checkpoint ``ckpt`` read from ``path``."""
    if ckpt.get("world_size", world) != world:
        raise UsageError(
            f"checkpoint {path} was written by {ckpt['world_size']} ranks, this run has {world}: "
            "residuals are per rank, so resume with the same number of ranks"
        )
    if rank == 0:
        return ckpt
    own = _rank_file(path, rank, ckpt["epoch"], ckpt["step"])
    if not own.exists():
        raise UsageError(f"checkpoint {path} is at epoch {ckpt['epoch']}, step {ckpt['step']}, but {own} is missing")
    mine = _load(own)
    if not isinstance(mine, dict) or (mine.get("epoch"), mine.get("step")) != (ckpt["epoch"], ckpt["step"]):
        raise UsageError(f"{own} does not belong to checkpoint {path}")
    return mine


def _progress(rank: int, total: int, label: str, initial: int) -> Any:
    class _Null:
        def update(self, n: int) -> None: ...

        def close(self) -> None: ...

    if rank != 0 or (not sys.stderr.isatty() and os.environ.get("GRADSPARSE_PROGRESS") != "1"):
        return _Null()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", leave=False)


def _tensorboard(args: argparse.Namespace, config: RunConfig, seed: int) -> Any:
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(args.tensorboard, f"seed{seed}"))


# Running the comparison ----------------------------------------------------------------


def _worker(args: argparse.Namespace) -> Optional[List[Dict[str, Any]]]:
    """One rank: every configuration and seed in turn. Returns the rows on rank 0."""
    from gradsparse.launch import init_distributed

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    if not dist.is_initialized():
        init_distributed(backend="gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rows: List[Dict[str, Any]] = []
    try:
        for spec in args.compare.split(","):
            config = parse_config(spec)
            for seed in args.seeds:
                for record in train(config, args, seed):
                    rows.append({"config": config.label, "seed": seed, **record})
    except KeyboardInterrupt:
        logger.warning("rank %d: interrupted; stopping", dist.get_rank())
        raise SystemExit(130) from None
    except RuntimeError as exc:
        reason = _peer_failure(exc)
        if reason is None:
            raise
        if args.verbose:
            logger.exception("rank %d: collective failed", dist.get_rank())
        print(
            f"gradsparse-train: error: rank {dist.get_rank()}: {reason}. Checkpoints (if any) are in "
            f"{args.out}: resume with --resume, or run with --max-restarts",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        # A process group with a dead peer cannot be torn down cleanly (destroy and DDP's
        # pending futures may block or abort): leave now, as the failure it is.
        os._exit(1)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rows if rank == 0 else None


_PEER_FAILURE = re.compile(r"(connection (reset|closed|refused)|broken pipe|timed out|timeout|peer)", re.IGNORECASE)


def _peer_failure(exc: BaseException) -> Optional[str]:
    """A one-line description when ``exc`` is a lost or unresponsive peer, else None."""
    text = str(exc)
    if not _PEER_FAILURE.search(text):
        return None
    lines = [ln for ln in text.splitlines() if _PEER_FAILURE.search(ln)]
    detail = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0])  # drop C++ source locations
    detail = detail.replace("Got the following error when running the callback: ", "")
    detail = re.sub(r"^(RuntimeError|DistBackendError): ", "", detail.strip())
    detail = detail.split(". ")[0].rstrip(".")  # gloo appends generic advice after the first sentence
    return "a peer rank died or stopped responding during a collective (" + detail[:300] + ")"


def _launch_local(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Start ``args.ranks`` local ranks with torch's elastic launcher (what torchrun uses)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=args.ranks,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=args.max_restarts,
        monitor_interval=0.5,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Each rendezvous round gets its own store (rank 0 hosts it). With the agent's shared
    # store, keys survive a restart and a restarted rank can read a dead peer's address.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    results = elastic_launch(config, _worker)(args)
    return results[0] or []


def summarise(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The last epoch of each configuration, averaged over seeds."""
    out = []
    for label in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == label]
        last_epoch = max(r["epoch"] for r in mine)
        final = [r for r in mine if r["epoch"] == last_epoch]
        accs = [r["test_accuracy"] for r in final]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1))
        avg = lambda key, f=final: sum(r[key] for r in f) / len(f)  # noqa: E731
        out.append(
            {
                "config": label,
                "seeds": len(final),
                "test_accuracy": mean,
                "accuracy_std": std,
                "loss": avg("loss"),
                "mb_sent": avg("mb_sent"),
                "compression_ratio": avg("compression_ratio"),
                "density": avg("density"),
                "seconds": avg("seconds"),
            }
        )
    return out


def markdown_table(summary: Sequence[Dict[str, Any]]) -> str:
    lines = [
        "| config | test accuracy (mean ± std) | final loss | MB sent per rank | compression | density | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['config']} | {100 * s['test_accuracy']:.2f}% ± {100 * s['accuracy_std']:.2f} | {s['loss']:.4f} "
            f"| {s['mb_sent']:.2f} | {s['compression_ratio']:.0f}x | {s['density']:.4f} | {s['seconds']:.1f} |"
        )
    return "\n".join(lines)


def write_outputs(rows: Sequence[Dict[str, Any]], out: Path) -> Dict[str, Path]:
    """results.csv (every epoch), summary.md, and PNG plots of accuracy against epochs
    and against megabytes sent."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "table": out / "summary.md"}
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["table"].write_text(markdown_table(summarise(rows)) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'gradsparse[train]')")
        return paths
    for name, xkey, xlabel in (
        ("accuracy_vs_epoch", "epoch", "epoch"),
        ("accuracy_vs_mb", "mb_sent", "MB sent per rank"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label in dict.fromkeys(r["config"] for r in rows):
            mine = [r for r in rows if r["config"] == label]
            epochs = sorted({r["epoch"] for r in mine})
            xs = [
                sum(r[xkey] for r in mine if r["epoch"] == e) / len([r for r in mine if r["epoch"] == e])
                for e in epochs
            ]
            ys = [
                100
                * sum(r["test_accuracy"] for r in mine if r["epoch"] == e)
                / len([r for r in mine if r["epoch"] == e])
                for e in epochs
            ]
            ax.plot(xs, ys, label=label, marker=".")
        if xkey == "mb_sent":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths[name] = out / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradsparse-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", type=int, default=4, help="local ranks to start (ignored under torchrun/mpirun)")
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    p.add_argument("--compressor", default="topk", help="compressor of a single run (see --compare)")
    p.add_argument("--density", type=float, default=None, help="density of a single run")
    p.add_argument("--no-error-feedback", action="store_true", help="turn error feedback off in a single run")
    p.add_argument("--compare", default=None, help='configurations to compare, e.g. "dense,topk:0.01,topk:0.01+noef"')
    p.add_argument("--collective", default="allgather", choices=available_collectives())
    p.add_argument("--warmup-steps", type=int, default=0, help="dense steps before compression starts")
    p.add_argument("--mask-sparsity", type=float, default=0.0, help="prune weights to this sparsity (gradual)")
    p.add_argument("--mask-criterion", default="magnitude", choices=["magnitude", "rigl", "set"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed)")
    p.add_argument("--out", default="runs/train", help="output directory")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints, also written at every epoch end (0: no checkpoints)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="elastic restarts of failed ranks (resume from checkpoints)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="collective timeout: a rank waiting this long on a peer fails instead of hanging (default 300)",
    )
    p.add_argument("--tensorboard", default=None, metavar="DIR")
    p.add_argument("--verbose", action="store_true")
    return p


def _validate(args: argparse.Namespace) -> None:
    """Everything checkable before any rank starts, reported as one clear line."""
    if args.compare is None:
        spec = "dense" if args.compressor == "dense" else args.compressor
        if args.density is not None:
            if args.compressor not in ("topk", "sampled_topk", "randomk"):
                raise UsageError(f"--density applies to topk, sampled_topk and randomk, not {args.compressor!r}")
            spec += f":{args.density}"
        args.compare = spec + ("+noef" if args.no_error_feedback and spec != "dense" else "")
    for spec in args.compare.split(","):
        parse_config(spec)
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    for name in ("epochs", "batch_size", "ranks"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.timeout > 0 or not math.isfinite(args.timeout):
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.max_restarts and not args.checkpoint_every:
        raise UsageError("--max-restarts needs --checkpoint-every N, or a restarted rank would start over")
    if not 0.0 <= args.mask_sparsity < 1.0:
        raise UsageError(f"--mask-sparsity must be in [0, 1), got {args.mask_sparsity}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    build_model(args.model)
    n_train = len(load_digits_split()[1])
    if args.ranks > n_train:
        raise UsageError(f"--ranks {args.ranks} is more than the {n_train} training samples")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to the output directory {out}: {exc.strerror or exc}") from None
    if args.resume:
        for spec in args.compare.split(","):
            for seed in args.seeds:
                path = _checkpoint_path(out, parse_config(spec), seed)
                if path.exists():
                    load_checkpoint(path, args.model)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _validate(args)
    except UsageError as exc:
        print(f"gradsparse-train: error: {exc}", file=sys.stderr)
        return 2
    under_launcher = any(v in os.environ for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rows = _worker(args) if under_launcher else _launch_local(args)
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
    paths = write_outputs(rows, Path(args.out))
    world = (
        args.ranks
        if not under_launcher
        else int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    )
    print(f"\n{args.model} on digits, {world} ranks, {args.epochs} epochs, seeds {args.seeds}")
    print(markdown_table(summarise(rows)))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
