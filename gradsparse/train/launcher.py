"""Running ranks: one rank's work under any launcher, the local elastic launcher behind
``--ranks N``, and the one-line report of a lost peer."""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import tempfile
import uuid
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

from .config import TrainConfig
from .loop import train

__all__ = ["STORE_ENV", "launch_local", "peer_failure", "worker"]

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


#: set by :func:`launch_local`: the workers meet through a file store (one per restart round)
STORE_ENV = "GRADSPARSE_LOCAL_STORE"
_FILE_RENDEZVOUS = "gradsparse-file"


def _local_store() -> Optional[dist.Store]:
    base = os.environ.get(STORE_ENV)
    if not base:
        return None
    # a fresh file each restart round: a restarted group never reads its dead predecessors' keys
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.FileStore(f"{base}.{restart}", int(os.environ["WORLD_SIZE"]))


def worker(config: TrainConfig) -> Optional[List[Dict[str, Any]]]:
    """One rank: every configuration and seed in turn. Returns the rows on rank 0."""
    from gradsparse.launch import init_distributed

    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=config.timeout)
        init_distributed(backend="gloo", timeout=timeout, store=_local_store())
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


class _FileRendezvousBackend(C10dRendezvousBackend):
    """torch elastic's c10d rendezvous state, kept in a file store."""

    @property
    def name(self) -> str:
        return _FILE_RENDEZVOUS


def _file_rendezvous(params: Any) -> Any:
    """torch elastic's dynamic rendezvous over a file store at ``params.endpoint`` (a path):
    the agent's rendezvous then listens on no socket at all."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    store = dist.FileStore(params.endpoint, -1)
    return create_handler(store, _FileRendezvousBackend(store, params.run_id), params)


def launch_local(config: TrainConfig) -> List[Dict[str, Any]]:
    """Start ``config.ranks`` local ranks with torch's elastic launcher (what torchrun uses).
    Nothing listens beyond loopback: the rendezvous and the ranks' process group meet through
    files, and gloo binds to ``lo``."""
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rendezvous_handler_registry.register(_FILE_RENDEZVOUS, _file_rendezvous)  # again is a no-op
    with tempfile.TemporaryDirectory(prefix="gradsparse-train-") as meet:
        launch = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=config.ranks,
            run_id=uuid.uuid4().hex[:8],
            rdzv_backend=_FILE_RENDEZVOUS,
            rdzv_endpoint=os.path.join(meet, "rendezvous"),
            max_restarts=config.max_restarts,
            monitor_interval=0.5,
        )
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ[STORE_ENV] = os.path.join(meet, "store")
        # Each rendezvous round gets its own store. With the agent's shared store, keys survive
        # a restart and a restarted rank can read a dead peer's address.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        try:
            results = elastic_launch(launch, worker)(config)
        finally:
            os.environ.pop(STORE_ENV, None)
    return results[0] or []
