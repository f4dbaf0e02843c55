"""Sparse collectives (installed as ``gradsparse.comm``).

Collectives take a :class:`~gradsparse.payload.SparsePayload` and a :class:`Backend` and
return the sum across ranks, bit-identical on every rank and every backend, with byte
accounting. They know nothing about compressors or hooks.

=====================  ==========================================================
``allgather``          every rank's message to every rank, scatter-add in rank order
``split_allgather``    SparCML: sparse reduce-scatter over P ranges, allgather ranges
``recursive_doubling`` SparCML SSAR/DSAR: log2(P) pairwise merges, dense past break-even
``oktopk``             Ok-Topk: balanced sparse reduce-scatter, then a global top-k (lossy)
``shared_topk``        ScaleCom: one rank per round chooses the indices, allreduce of values
``dense``              reduce-scatter + allgather of the densified tensor
``auto``               the fastest of the exact ones under a measured alpha-beta model
=====================  ==========================================================

``fixed`` holds the fixed-size messages of the hook's sync-free device route (equal-size
allgather and broadcast only, flags in the messages, no count read on the host).

Backends: :class:`TorchDistBackend` (any process group), ``MPIBackend`` (mpi4py) and
``HorovodBackend`` (Horovod's collectives), the last two imported on first use.
"""

from __future__ import annotations

from . import fixed
from .auto import AutoCollective
from .backend import Backend, CommStats, TorchDistBackend, binomial_sends, completed_future, ring_allreduce_bytes
from .collectives import (
    AllgatherCollective,
    Collective,
    DenseCollective,
    Reduced,
    allreduce_ordered,
    available,
    build,
    registry,
)
from .cost import LinkModel, SparseCost, measure_link, predict
from .oktopk import OkTopkCollective
from .shared import SharedIndices, SharedTopkCollective
from .sparcml import RecursiveDoublingCollective, SplitAllgatherCollective
from .wire import Headers, Message, PayloadError, PeerError

__all__ = [
    "AllgatherCollective",
    "AutoCollective",
    "Backend",
    "Collective",
    "CommStats",
    "DenseCollective",
    "Headers",
    "HorovodBackend",
    "LinkModel",
    "MPIBackend",
    "Message",
    "OkTopkCollective",
    "PayloadError",
    "PeerError",
    "RecursiveDoublingCollective",
    "Reduced",
    "SharedIndices",
    "SharedTopkCollective",
    "SparseCost",
    "SplitAllgatherCollective",
    "TorchDistBackend",
    "allreduce_ordered",
    "fixed",
    "available",
    "binomial_sends",
    "build",
    "completed_future",
    "measure_link",
    "predict",
    "registry",
    "ring_allreduce_bytes",
]


def __getattr__(name: str) -> object:
    # mpi4py and Horovod are optional: import their backends only when asked for.
    if name == "MPIBackend":
        from .mpi_backend import MPIBackend

        return MPIBackend
    if name == "HorovodBackend":
        from .horovod_backend import HorovodBackend

        return HorovodBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
