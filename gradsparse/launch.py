"""Initialise torch.distributed from whichever launcher started this process.

Recognised, in this order:

* torchrun / torch.distributed.run: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
* OpenMPI's mpirun: ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``;
* MPICH / Hydra and Intel MPI: ``PMI_RANK``, ``PMI_SIZE`` (``MPI_LOCALRANKID``);
* Slurm's srun: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
* horovodrun: ``HOROVOD_RANK``, ``HOROVOD_SIZE``, ``HOROVOD_LOCAL_RANK``.

Under an MPI launcher without ``MASTER_ADDR``/``MASTER_PORT``, rank 0 picks its host and
a free port and broadcasts them with mpi4py when it is installed.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ["LaunchInfo", "detect_launcher", "init_distributed"]

logger = logging.getLogger(__name__)

_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK"),
)


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str
    rank: int
    world_size: int
    local_rank: int


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def detect_launcher(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Rank, world size and local rank from the launcher's environment variables."""
    env = os.environ if env is None else env
    for name, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = _int(env, rank_var), _int(env, size_var)
            local = _int(env, local_var) if local_var in env else 0
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{name} environment is inconsistent: {rank_var}={rank}, {size_var}={size}")
            return LaunchInfo(name, rank, size, local)
    looked_for = "; ".join(f"{n}: {r} and {s}" for n, r, s, _ in _LAUNCHERS)
    raise RuntimeError(
        "gradsparse.launch could not tell which launcher started this process. It looked for "
        f"{looked_for}. Start it with torchrun, mpirun, srun or horovodrun, or set RANK, "
        "WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _rendezvous_from_mpi(info: LaunchInfo) -> None:
    """Share rank 0's address and a free port through MPI (a few bytes, once)."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            f"launched by {info.launcher} without MASTER_ADDR/MASTER_PORT: set them (rank 0's "
            "address and a free port), or install mpi4py (pip install 'gradsparse[mpi]') so that "
            "rank 0 can share them"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.world_size:
        raise RuntimeError(
            f"world size mismatch: the {info.launcher} environment says {info.world_size} ranks, "
            f"MPI.COMM_WORLD has {comm.Get_size()}"
        )
    addr, port = comm.bcast((socket.gethostname(), _free_port()) if info.rank == 0 else None, root=0)
    os.environ.setdefault("MASTER_ADDR", addr if info.world_size > 1 else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def _warn_shared_elastic_store(env: Mapping[str, str]) -> bool:
    """Warn when torchrun restarts workers into the agent's shared store.

    That store outlives the workers, so the keys a restarted process group reads (gloo's
    per-rank addresses, barrier counters) can still be its dead predecessors': the restart
    then fails in ``connectFullMesh`` with "Connection refused", or waits. Setting
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun gives every round a fresh store.
    """
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if shared and restarts.isdigit() and int(restarts) > 0:
        logger.warning(
            "torchrun --max-restarts %s with the agent's shared store: a restarted rank may read a dead "
            "peer's address and fail to connect. Launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "(scripts/launch and gradsparse-train set it).",
            restarts,
        )
        return True
    return False


def init_distributed(
    backend: Optional[str] = None,
    timeout: Optional[datetime.timedelta] = None,
    store: Optional[dist.Store] = None,
) -> LaunchInfo:
    """Initialise the default process group from the launcher's environment.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. With ``store`` (a
    ``FileStore``, say) the ranks meet through it instead of ``MASTER_ADDR``/``MASTER_PORT``.
    Returns what was detected. Raises when nothing is recognised, or when the process group's world size
    does not match the environment's.
    """
    info = detect_launcher()
    if info.launcher != "torchrun":
        _rendezvous_from_mpi(info)
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ and store is None:
            raise RuntimeError(f"launched by {info.launcher}, but {var} is not set")
    _warn_shared_elastic_store(os.environ)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        options: dict = {"store": store} if store is not None else {}
        if timeout is not None:
            options["timeout"] = timeout
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, **options)
    if dist.get_world_size() != info.world_size or dist.get_rank() != info.rank:
        raise RuntimeError(
            f"world size mismatch: the {info.launcher} environment says rank {info.rank} of "
            f"{info.world_size}, the process group has rank {dist.get_rank()} of {dist.get_world_size()}"
        )
    logger.info("torch.distributed initialised from %s: rank %d of %d", info.launcher, info.rank, info.world_size)
    return info
