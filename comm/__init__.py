"""Sparse collectives (installed as ``gradsparse.comm``).

Collectives take a :class:`~gradsparse.payload.SparsePayload` and a :class:`Backend` and
return the exact sum across ranks, with byte accounting. They know nothing about
compressors.
"""

from __future__ import annotations

from .backend import Backend, CommStats, TorchDistBackend, completed_future
from .collectives import (
    AllgatherCollective,
    Collective,
    DenseCollective,
    Reduced,
    available,
    build,
    registry,
)
from .wire import FLAG_ERROR, FLAG_NONFINITE, Headers, PayloadError, PeerError

__all__ = [
    "FLAG_ERROR",
    "FLAG_NONFINITE",
    "AllgatherCollective",
    "Backend",
    "Collective",
    "CommStats",
    "DenseCollective",
    "Headers",
    "PayloadError",
    "PeerError",
    "Reduced",
    "TorchDistBackend",
    "available",
    "build",
    "completed_future",
    "registry",
]
