"""Training one configuration on this rank: model, hook and optimizer, resuming, the
epoch loop, evaluation and periodic checkpoints."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from gradsparse import compressors
from gradsparse.comm import ring_allreduce_bytes
from gradsparse.ddp import SparseHookState, register_sparse_hook
from gradsparse.masking import WeightMasker
from gradsparse.train.digits import build_model, load_digits_split

from . import checkpoint
from .config import RunConfig, TrainConfig, UsageError

__all__ = ["train"]

logger = logging.getLogger("gradsparse.train")


@dataclass
class _Setup:
    model: nn.Module
    ddp: nn.parallel.DistributedDataParallel
    optimizer: torch.optim.Optimizer
    state: Optional[SparseHookState]
    masker: Optional[WeightMasker]
    steps_per_epoch: int


def _build(config: TrainConfig, run: RunConfig, seed: int, n_train: int) -> _Setup:
    world = dist.get_world_size()
    torch.manual_seed(seed)
    model = build_model(config.model)
    ddp = nn.parallel.DistributedDataParallel(model)
    steps_per_epoch = math.ceil(n_train / (config.batch_size * world))
    masker = None
    if config.mask_sparsity:
        steps_total = config.epochs * steps_per_epoch
        masker = WeightMasker(
            model,
            config.mask_sparsity,
            criterion=config.mask_criterion,
            schedule="gradual",
            end_step=steps_total // 2,
            frequency=max(1, steps_total // 40),
            regrow_every=max(1, steps_total // 20),
        )
    state = None
    if run.compressor is not None:
        state = register_sparse_hook(
            ddp,
            compressors.build(run.compressor, **run.params),
            error_feedback=run.error_feedback,
            collective=config.collective,
            start_step=config.dense_steps,
            masker=masker,
        )
    optimizer = torch.optim.SGD(ddp.parameters(), lr=config.lr, momentum=0.9)
    return _Setup(model, ddp, optimizer, state, masker, steps_per_epoch)


def _resume(config: TrainConfig, run: RunConfig, seed: int, setup: _Setup) -> checkpoint.Position:
    """Where to start: from the checkpoint when resuming (or restarted elastically)."""
    start = checkpoint.Position(0, 0, [], torch.zeros(2))
    path = checkpoint.checkpoint_path(config.out, run, seed)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if not (config.resume or restarted) or not path.exists():
        return start
    ckpt = checkpoint.load_checkpoint(path, config.model)
    setup.model.load_state_dict(ckpt["model"])
    setup.optimizer.load_state_dict(ckpt["optimizer"])
    own = checkpoint.load_own_state(path, ckpt, dist.get_rank(), dist.get_world_size())  # residuals differ by rank
    if setup.state is not None:
        setup.state.load_state_dict(own["hook"])
    if setup.masker is not None:
        if ckpt.get("masks") is None:
            raise UsageError(f"checkpoint {path} has no masks, but --mask-sparsity is set")
        setup.masker.load_state_dict(ckpt["masks"])
    old_world, world = int(ckpt.get("world_size", dist.get_world_size())), dist.get_world_size()
    step = _steps_on(ckpt["step"], old_world, setup.steps_per_epoch)
    logger.info("resumed %s (seed %d) at epoch %d, step %d", run.label, seed, ckpt["epoch"], step)
    if dist.get_rank() == 0:  # the CLI's one line about what it resumed
        resharded = "resharded" if setup.state is not None and old_world != world else "as saved"
        hook = f"hook state {resharded}" if setup.state is not None else "no hook state"
        print(
            f"gradsparse-train: resumed {run.label} (seed {seed}) from {path.name} at epoch {ckpt['epoch']}, "
            f"step {step}: written by {old_world} ranks, now {world}; {hook}",
            flush=True,
        )
    return checkpoint.Position(ckpt["epoch"], step, list(ckpt["records"]), own["epoch_loss"])


def _steps_on(step: int, old_world: int, per_epoch: int) -> int:
    """A mid-epoch position written by ``old_world`` ranks, in this run's steps: as many
    samples processed (which samples differs: each rank takes every world-th of the order)."""
    world = dist.get_world_size()
    if old_world == world:
        return step
    return min(per_epoch, math.ceil(step * old_world / world))


def _save(config: TrainConfig, run: RunConfig, seed: int, setup: _Setup, at: checkpoint.Position) -> None:
    hook = setup.state.state_dict() if setup.state is not None else None
    masks = setup.masker.state_dict() if setup.masker is not None else None
    path = checkpoint.checkpoint_path(config.out, run, seed)
    checkpoint.save(path, config.model, run, setup.model, setup.optimizer, hook, masks, at)


def _step(setup: _Setup, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> float:
    setup.optimizer.zero_grad()
    # an uneven last batch joins the collective with a zero gradient
    loss = nn.functional.cross_entropy(setup.ddp(x[idx]), y[idx]) if idx.numel() else setup.ddp(x[:1]).sum() * 0.0
    loss.backward()
    setup.optimizer.step()
    if setup.masker is not None:
        setup.masker.step(setup.optimizer)
    return float(loss.detach())


def train(config: TrainConfig, run: RunConfig, seed: int) -> List[Dict[str, Any]]:
    """Train one configuration on this rank; return per-epoch records (same on all ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    setup = _build(config, run, seed, len(y_train))
    n_params = sum(p.numel() for p in setup.model.parameters())
    at = _resume(config, run, seed, setup)
    per_epoch = setup.steps_per_epoch
    writer = _tensorboard(config, seed) if rank == 0 else None
    progress = _progress(rank, config.epochs * per_epoch, run.label, at.epoch * per_epoch + at.step)
    started = time.perf_counter() - (at.records[-1]["seconds"] if at.records else 0.0)
    global_step = at.epoch * per_epoch + at.step
    for epoch in range(at.epoch, config.epochs):
        mine = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed * 10_007 + epoch))[rank::world]
        setup.ddp.train()
        total = at.epoch_loss.clone() if epoch == at.epoch else torch.zeros(2)
        for step in range(at.step if epoch == at.epoch else 0, per_epoch):
            idx = mine[step * config.batch_size : (step + 1) * config.batch_size]
            total += torch.tensor([_step(setup, x_train, y_train, idx) * idx.numel(), idx.numel()])
            global_step += 1
            progress.update(1)
            # (the last step of an epoch is checkpointed below, with the epoch's record)
            if config.checkpoint_every and global_step % config.checkpoint_every == 0 and step + 1 < per_epoch:
                _save(config, run, seed, setup, checkpoint.Position(epoch, step + 1, at.records, total))
        dist.all_reduce(total)
        record = _evaluate(setup, x_test, y_test, epoch, total, n_params, global_step, started)
        at.records.append(record)
        if writer is not None:
            for key in ("loss", "test_accuracy", "mb_sent", "compression_ratio", "density", "residual_norm"):
                writer.add_scalar(f"{run.label}/{key}", record[key], epoch + 1)
        if config.checkpoint_every:
            _save(config, run, seed, setup, checkpoint.Position(epoch + 1, 0, at.records, torch.zeros(2)))
    progress.close()
    if writer is not None:
        writer.close()
    return at.records


def _evaluate(
    setup: _Setup,
    x: torch.Tensor,
    y: torch.Tensor,
    epoch: int,
    total: torch.Tensor,
    n_params: int,
    steps: int,
    started: float,
) -> Dict[str, Any]:
    setup.model.eval()
    with torch.no_grad():
        accuracy = float((setup.model(x).argmax(1) == y).float().mean())
    dense_bytes = ring_allreduce_bytes(n_params, 4, dist.get_world_size()) * steps
    stats = setup.state.stats() if setup.state is not None else {}
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
        "weight_sparsity": setup.masker.global_sparsity() if setup.masker is not None else 0.0,
    }


class _NoProgress:
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _progress(rank: int, total: int, label: str, initial: int) -> Any:
    if rank != 0 or (not sys.stderr.isatty() and os.environ.get("GRADSPARSE_PROGRESS") != "1"):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", leave=False)


def _tensorboard(config: TrainConfig, seed: int) -> Any:
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(config.tensorboard, f"seed{seed}"))
