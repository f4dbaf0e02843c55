"""Sparse collectives (installed as ``gradsparse.comm``).

Collectives take a :class:`~gradsparse.payload.SparsePayload` and a :class:`Backend` and
return the sum across ranks, bit-identical on every rank and every backend, with byte
accounting. They know nothing about compressors.

=====================  ==========================================================
``allgather``          every rank's message to every rank, scatter-add in rank order
``split_allgather``    SparCML: sparse reduce-scatter over P ranges, allgather ranges
``recursive_doubling`` SparCML SSAR/DSAR: log2(P) pairwise merges, dense past break-even
``oktopk``             Ok-Topk: balanced sparse reduce-scatter, then a global top-k (lossy)
``dense``              reduce-scatter + allgather of the densified tensor
``auto``               the fastest of the exact ones under a measured alpha-beta model
=====================  ==========================================================
"""

from __future__ import annotations

from .auto import AutoCollective, LinkModel, measure_link
from .backend import Backend, CommStats, TorchDistBackend, completed_future
from .collectives import (
    AllgatherCollective,
    Collective,
    DenseCollective,
    Reduced,
    allreduce_dense,
    available,
    build,
    registry,
)
from .oktopk import OkTopkCollective
from .sparcml import RecursiveDoublingCollective, SplitAllgatherCollective
from .wire import FLAG_ERROR, FLAG_NONFINITE, Headers, Message, PayloadError, PeerError

__all__ = [
    "FLAG_ERROR",
    "FLAG_NONFINITE",
    "AllgatherCollective",
    "AutoCollective",
    "Backend",
    "Collective",
    "CommStats",
    "DenseCollective",
    "Headers",
    "LinkModel",
    "Message",
    "MPIBackend",
    "OkTopkCollective",
    "PayloadError",
    "PeerError",
    "RecursiveDoublingCollective",
    "Reduced",
    "SplitAllgatherCollective",
    "TorchDistBackend",
    "allreduce_dense",
    "available",
    "build",
    "completed_future",
    "measure_link",
    "registry",
]


def __getattr__(name: str) -> object:
    # mpi4py is optional: import the MPI backend only when it is asked for.
    if name == "MPIBackend":
        from .mpi import MPIBackend

        return MPIBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
