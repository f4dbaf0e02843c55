"""Running ranks: one rank's work under any launcher, the local elastic launcher behind
``--ranks N``, and the one-line report of a lost peer."""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
import uuid
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .config import TrainConfig
from .loop import train

__all__ = ["launch_local", "peer_failure", "worker"]

logger = logging.getLogger("gradsparse.train")

_PEER_FAILURE = re.compile(r"(connection (reset|closed|refused)|broken pipe|timed out|timeout|peer)", re.IGNORECASE)


def peer_failure(exc: BaseException) -> Optional[str]:
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


def _train_all(config: TrainConfig) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for run in config.runs:
        for seed in config.seeds:
            rows += [{"config": run.label, "seed": seed, **record} for record in train(config, run, seed)]
    return rows


def worker(config: TrainConfig) -> Optional[List[Dict[str, Any]]]:
    """One rank: every configuration and seed in turn. Returns the rows on rank 0."""
    from gradsparse.launch import init_distributed

    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    if not dist.is_initialized():
        init_distributed(backend="gloo", timeout=datetime.timedelta(seconds=config.timeout))
    try:
        rows = _train_all(config)
    except KeyboardInterrupt:
        logger.warning("rank %d: interrupted; stopping", dist.get_rank())
        raise SystemExit(130) from None
    except RuntimeError as exc:
        reason = peer_failure(exc)
        if reason is None:
            raise
        if config.verbose:
            logger.exception("rank %d: collective failed", dist.get_rank())
        print(
            f"gradsparse-train: error: rank {dist.get_rank()}: {reason}. Checkpoints (if any) are in "
            f"{config.out}: resume with --resume, or run with --max-restarts",
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


def launch_local(config: TrainConfig) -> List[Dict[str, Any]]:
    """Start ``config.ranks`` local ranks with torch's elastic launcher (what torchrun uses)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.ranks,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=config.max_restarts,
        monitor_interval=0.5,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Each rendezvous round gets its own store (rank 0 hosts it). With the agent's shared
    # store, keys survive a restart and a restarted rank can read a dead peer's address.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    results = elastic_launch(launch, worker)(config)
    return results[0] or []
