"""Crash-consistent checkpoints of a training run, with every rank's own hook state.

Residuals (and this epoch's partial loss sums) differ by rank: ranks > 0 first write their
own part to a file named by the position (epoch, step). Rank 0 then writes the main file
(model, optimizer and masks, identical everywhere, with its own hook state), which is the
commit point: it names the position, so a restart reads either the old checkpoint with the
old per-rank files or the new one with the new files, never a mix. Older per-rank files go
only after the commit. Everything is read back with ``weights_only=True``. A checkpoint
written by N ranks resumes on M: the hook states are resharded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from gradsparse.reshard import reshard_states

from .config import RunConfig, UsageError

__all__ = ["CHECKPOINT_FORMAT", "Position", "checkpoint_path", "load_checkpoint", "load_own_state", "rank_file", "save"]

logger = logging.getLogger("gradsparse.train")

CHECKPOINT_FORMAT = "gradsparse-train/2"


@dataclass
class Position:
    """Where a run stands: the next (epoch, step), the finished epochs' records, and this
    rank's partial loss sums of the current epoch."""

    epoch: int
    step: int
    records: List[Dict[str, Any]]
    epoch_loss: torch.Tensor


def checkpoint_path(out: Path, run: RunConfig, seed: int) -> Path:
    safe = run.label.replace(":", "_").replace("+", "_")
    return out / "checkpoints" / f"{safe}-seed{seed}.pt"


def rank_file(path: Path, rank: int, epoch: int, step: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}.e{epoch}s{step}.pt")


def _save_atomic(path: Path, payload: Dict[str, Any]) -> None:
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
    """Load the main file and check that it belongs to this model."""
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a gradsparse-train checkpoint")
    if ckpt.get("model_name") != model_name:
        raise UsageError(
            f"checkpoint {path} was saved for model {ckpt.get('model_name')!r}, not {model_name!r}; "
            f"pass --model {ckpt.get('model_name')} or start without --resume"
        )
    return ckpt


def save(
    path: Path,
    model_name: str,
    run: RunConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    hook: Optional[Dict[str, Any]],
    masks: Optional[Dict[str, Any]],
    at: Position,
) -> None:
    """Write a checkpoint at ``at`` that a crash at any moment leaves consistent (every
    rank calls this together)."""
    rank = dist.get_rank()
    if rank != 0:
        mine = {"hook": hook, "epoch_loss": at.epoch_loss, "epoch": at.epoch, "step": at.step}
        _save_atomic(rank_file(path, rank, at.epoch, at.step), mine)
    dist.barrier()  # every rank's state is on disk before the main file names it
    if rank == 0:
        main = {
            "format": CHECKPOINT_FORMAT,
            "model_name": model_name,
            "config": run.label,
            "world_size": dist.get_world_size(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "hook": hook,
            "epoch_loss": at.epoch_loss,
            "masks": masks,
            "epoch": at.epoch,
            "step": at.step,
            "records": at.records,
        }
        _save_atomic(path, main)
    dist.barrier()  # committed
    if rank != 0:
        current = rank_file(path, rank, at.epoch, at.step)
        for old in path.parent.glob(f"{path.stem}.rank{rank}.e*.pt"):
            if old != current:
                old.unlink(missing_ok=True)


def _rank_part(path: Path, ckpt: Dict[str, Any], rank: int) -> Dict[str, Any]:
    """Rank ``rank``'s own file of the checkpoint ``ckpt`` (rank 0's part is the main file)."""
    if rank == 0:
        return ckpt
    own = rank_file(path, rank, ckpt["epoch"], ckpt["step"])
    if not own.exists():
        raise UsageError(f"checkpoint {path} is at epoch {ckpt['epoch']}, step {ckpt['step']}, but {own} is missing")
    mine = _load(own)
    if not isinstance(mine, dict) or (mine.get("epoch"), mine.get("step")) != (ckpt["epoch"], ckpt["step"]):
        raise UsageError(f"{own} does not belong to checkpoint {path}")
    return mine


def load_own_state(path: Path, ckpt: Dict[str, Any], rank: int, world: int) -> Dict[str, Any]:
    """This rank's part (``hook``, ``epoch_loss``) of the checkpoint ``ckpt`` read from ``path``.

    Written by another number of ranks, every old rank's part is read and the hook states
    are resharded (:func:`gradsparse.reshard_states`: per parameter, the mean residual over
    the ranks is preserved); the epoch's partial loss sums go to rank 0."""
    old = int(ckpt.get("world_size", world))
    if old == world:
        return _rank_part(path, ckpt, rank)
    parts = [_rank_part(path, ckpt, r) for r in range(old)]
    hooks = [p["hook"] for p in parts]
    hook = None
    if hooks[0] is not None:
        try:
            hook = reshard_states(hooks, world)[rank]
        except ValueError as exc:
            raise UsageError(f"cannot reshard checkpoint {path} from {old} to {world} ranks: {exc}") from None
    loss = torch.stack([p["epoch_loss"] for p in parts]).sum(0) if rank == 0 else torch.zeros(2)
    if rank == 0:
        logger.info("checkpoint %s was written by %d ranks: resharded for %d", path, old, world)
    return {"hook": hook, "epoch_loss": loss}
