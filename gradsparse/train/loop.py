"""Training one configuration on this rank: model, hook and optimizer, resuming, the
epoch loop, evaluation and periodic checkpoints."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from gradsparse import compressors
from gradsparse.baselines import baseline_bucket_cap_mb, baseline_bytes, register_baseline
from gradsparse.ddp import SparseHookState, register_sparse_hook
from gradsparse.masking import WeightMasker
from gradsparse.optim import SparseAdamW

from . import checkpoint
from .config import RunConfig, TrainConfig, UsageError
from .tasks import Data, Task, get_task

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
    total_steps: int
    scheduler: Optional[Any]
    bytes_per_step: int  # what DDP or a baseline sends per rank and step (the sparse hook counts its own)
    clip: float


def _optimizer(config: TrainConfig, task: Task, run: RunConfig, params: Any, state: Optional[SparseHookState]) -> Any:
    """``--optimizer``: SGD with momentum 0.9, AdamW (betas 0.9, 0.99), or SparseAdamW on
    the sparse hook (AdamW with the same settings where the run has no sparse hook)."""
    lr, decay = getattr(task.defaults, "sgd" if config.optimizer == "sgd" else "adamw")
    lr = config.lr if config.lr is not None else lr
    decay = config.weight_decay if config.weight_decay is not None else decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay)
    if config.optimizer == "sparse_adamw" and state is not None:
        # --dense-steps unset: SparseAdamW's own warm-up (at least 50 steps, and the schedule's,
        # then 6 x as many more), in signs unless the configuration says +nosigns (then dense);
        # +signs=N: N steps of signs
        return SparseAdamW(
            params, lr=lr, betas=(0.9, 0.99), weight_decay=decay, hook=state, dense_steps=config.dense_steps,
            sign_steps=run.sign_steps,
        )  # fmt: skip
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=decay)


def _build(config: TrainConfig, task: Task, run: RunConfig, seed: int, n_train: int) -> _Setup:
    world = dist.get_world_size()
    torch.manual_seed(seed)
    model = task.build()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=baseline_bucket_cap_mb(run.baseline or "", model))
    steps_per_epoch = math.ceil(n_train / (config.batch_size * world))
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    masker = None
    if config.mask_sparsity:
        masker = WeightMasker(
            model,
            config.mask_sparsity,
            criterion=config.mask_criterion,
            schedule="gradual",
            end_step=total_steps // 2,
            frequency=max(1, total_steps // 40),
            regrow_every=max(1, total_steps // 20),
        )
    state = None
    if run.compressor is not None:
        state = register_sparse_hook(
            ddp,
            compressors.build(run.compressor, **run.params),
            error_feedback=run.error_feedback,
            collective=run.collective or config.collective,
            start_step=config.dense_steps or 0,
            masker=masker,
        )
    elif run.baseline is not None:
        register_baseline(ddp, run.baseline)
    optimizer = _optimizer(config, task, run, ddp.parameters(), state)
    scheduler = None
    if (config.schedule or task.defaults.schedule) == "onecycle" and total_steps > 2:
        peak = optimizer.param_groups[0]["lr"]
        warmup = max(0.1, 2.0 / total_steps)  # 10% warm-up, at least 2 steps (OneCycleLR divides by zero below)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peak, total_steps=total_steps, pct_start=warmup
        )
    sent = baseline_bytes(run.baseline or "ddp", model.parameters(), world)
    clip = task.defaults.sgd_clip if config.optimizer == "sgd" else 0.0
    return _Setup(model, ddp, optimizer, state, masker, steps_per_epoch, total_steps, scheduler, sent, clip)


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


def _step(setup: _Setup, task: Task, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> float:
    setup.optimizer.zero_grad()
    # an uneven last batch joins the collective with a zero gradient
    loss = task.loss(setup.ddp(x[idx]), y[idx]) if idx.numel() else setup.ddp(x[:1]).sum() * 0.0
    loss.backward()
    if setup.clip:  # the averaged gradient, the same on every rank (SGD only: see docs/optimizers.md)
        nn.utils.clip_grad_norm_(setup.model.parameters(), setup.clip)
    setup.optimizer.step()
    if setup.scheduler is not None:
        setup.scheduler.step()
    if setup.masker is not None:
        setup.masker.step(setup.optimizer)
    return float(loss.detach())


class _Clock:
    """Training time: the wall clock, less the time spent evaluating."""

    def __init__(self, already: float) -> None:
        self.started = time.perf_counter() - already

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def pause(self, since: float) -> None:
        self.started += time.perf_counter() - since


def _fast_forward(setup: _Setup, steps: int) -> None:
    """A resumed run's schedule, where it stood after ``steps`` steps."""
    if setup.scheduler is None:
        return
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": on purpose here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            setup.scheduler.step()


def train(config: TrainConfig, run: RunConfig, seed: int) -> List[Dict[str, Any]]:
    """Train one configuration on this rank; return the records of every evaluation (at
    each epoch's end, or every ``config.eval_every`` steps). Rank 0's hold the held-out
    metrics; the other ranks' have the rest."""
    rank, world = dist.get_rank(), dist.get_world_size()
    task = get_task(config.model)
    data = task.load()
    setup = _build(config, task, run, seed, len(data.y_train))
    at = _resume(config, run, seed, setup)
    per_epoch, total_steps = setup.steps_per_epoch, setup.total_steps
    global_step = at.epoch * per_epoch + at.step
    _fast_forward(setup, global_step)
    writer = _tensorboard(config, seed) if rank == 0 else None
    progress = _progress(rank, total_steps, run.label, global_step)
    clock = _Clock(at.records[-1]["seconds"] if at.records else 0.0)
    total = at.epoch_loss.clone()
    for epoch in range(at.epoch, math.ceil(total_steps / per_epoch)):
        mine = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        mine = mine[rank::world]
        setup.ddp.train()
        for step in range(at.step if epoch == at.epoch else 0, min(per_epoch, total_steps - epoch * per_epoch)):
            idx = mine[step * config.batch_size : (step + 1) * config.batch_size]
            total += torch.tensor([_step(setup, task, data.x_train, data.y_train, idx) * idx.numel(), idx.numel()])
            global_step += 1
            progress.update(1)
            ends = step + 1 == per_epoch or global_step == total_steps
            if ends or (config.eval_every and global_step % config.eval_every == 0):
                _record(setup, task, data, total, (epoch, global_step), clock, at.records, writer, run.label)
                total = torch.zeros(2)
            if config.checkpoint_every and (ends or global_step % config.checkpoint_every == 0):
                position = (epoch + 1, 0) if step + 1 == per_epoch else (epoch, step + 1)
                _save(config, run, seed, setup, checkpoint.Position(*position, at.records, total))
    progress.close()
    if writer is not None:
        writer.close()
    return at.records


def _record(
    setup: _Setup,
    task: Task,
    data: Data,
    total: torch.Tensor,
    where: Tuple[int, int],
    clock: _Clock,
    records: List[Dict[str, Any]],
    writer: Any,
    label: str,
) -> None:
    """Evaluate, append the record, log it; the evaluation's time is not training time."""
    seconds, since = clock.seconds(), time.perf_counter()
    summed = total.clone()
    dist.all_reduce(summed)
    epoch, steps = where
    world = dist.get_world_size()
    stats = setup.state.stats() if setup.state is not None else {}
    sent = stats.get("bytes_sent", setup.bytes_per_step * steps)
    dense_bytes = baseline_bytes("ddp", setup.model.parameters(), world) * steps
    record: Dict[str, Any] = {
        "epoch": epoch + 1,
        "step": steps,
        "loss": float(summed[0] / max(float(summed[1]), 1.0)),
        # rank 0 evaluates, the others go on to the next step's collectives and wait there
        **(task.evaluate(setup.model, data) if dist.get_rank() == 0 else {}),
        "mb_sent": sent / 1e6,
        "compression_ratio": dense_bytes / sent if sent else float("inf"),
        "density": stats.get("density", 1.0),
        "residual_norm": stats.get("residual_norm", 0.0),
        "seconds": seconds,
        "weight_sparsity": setup.masker.global_sparsity() if setup.masker is not None else 0.0,
    }
    setup.ddp.train()
    records.append(record)
    if writer is not None:
        for key, value in record.items():
            if key not in ("epoch", "step"):
                writer.add_scalar(f"{label}/{key}", value, steps)
    clock.pause(since)


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
