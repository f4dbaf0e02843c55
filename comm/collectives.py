"""Sparse collectives: every rank's payload in, the exact sum out, identical on all ranks.

A collective knows nothing about compressors. ``reduce`` starts the communication and
returns a future of a :class:`Reduced`, whose :meth:`Reduced.write` produces the dense sum
into a caller's buffer. Parts are always applied in rank order, so the floating-point
additions happen in the same order on every rank whatever order messages arrived in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Tuple, Type

import torch

from gradsparse.payload import SparsePayload
from gradsparse.registry import Registry

from .backend import Backend, completed_future
from .wire import Headers, exchange_headers, pack, segment_bytes, unpack

__all__ = [
    "Reduced",
    "Collective",
    "AllgatherCollective",
    "DenseCollective",
    "registry",
    "build",
    "available",
]


@dataclass
class Reduced:
    """The sum across ranks, as sparse parts and dense ranges applied in a fixed order."""

    numel: int
    sparse: List[SparsePayload] = field(default_factory=list)
    dense: List[Tuple[int, torch.Tensor]] = field(default_factory=list)
    nonfinite: bool = False

    def write(self, out: torch.Tensor) -> torch.Tensor:
        """Write the sum into the flat ``out`` (``numel`` entries); NaN everywhere when
        any rank reported a non-finite gradient, so that AMP skips the step on all ranks."""
        if out.numel() != self.numel:
            raise ValueError(f"output has {out.numel()} entries, the reduction has {self.numel}")
        if self.nonfinite:
            return out.fill_(float("nan"))
        out.zero_()
        for part in self.sparse:
            part.to_dense(out)
        for offset, values in self.dense:
            out[offset : offset + values.numel()].add_(values.to(out.dtype))
        return out

    def to_dense(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.write(torch.empty(self.numel, dtype=dtype, device=device))


class Collective(ABC):
    """Sum sparse payloads across the ranks of a backend."""

    name: ClassVar[str] = ""

    def reduce(
        self, payload: SparsePayload, backend: Backend, *, flags: int = 0
    ) -> torch.futures.Future[Reduced]:
        """Exchange headers (validated identically on every rank), then sum."""
        headers = exchange_headers(backend, payload, flags)
        if headers.nonfinite:
            return completed_future(Reduced(headers.numel, nonfinite=True))
        return self._reduce(payload, backend, headers)

    @abstractmethod
    def _reduce(
        self, payload: SparsePayload, backend: Backend, headers: Headers
    ) -> torch.futures.Future[Reduced]: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


registry: Registry[Type[Collective]] = Registry("collective")


@registry.register("allgather")
class AllgatherCollective(Collective):
    """Variable-length allgather of (index, value) pairs, then a scatter-add in rank order.

    Each rank sends its k pairs to each of the P-1 others: (P-1)·k·(4+4) bytes with int32
    indices and fp32 values, against 2(P-1)/P·4n for a dense ring allreduce: it loses
    once P exceeds about 1/density.
    """

    name = "allgather"

    def _reduce(
        self, payload: SparsePayload, backend: Backend, headers: Headers
    ) -> torch.futures.Future[Reduced]:
        if sum(headers.counts) == 0:
            return completed_future(Reduced(headers.numel))
        message = pack(payload)
        sizes = [segment_bytes(c, headers.value_dtype, headers.index_dtype) for c in headers.counts]
        fut = backend.allgatherv(message, sizes)
        counts = headers.counts

        def _finish(f: torch.futures.Future[torch.Tensor]) -> Reduced:
            return Reduced(headers.numel, sparse=unpack(f.value(), counts, headers))

        return fut.then(_finish)


@registry.register("dense")
class DenseCollective(Collective):
    """Densify, then a ring allreduce: 2(P-1)/P·n·itemsize bytes each way."""

    name = "dense"

    def _reduce(
        self, payload: SparsePayload, backend: Backend, headers: Headers
    ) -> torch.futures.Future[Reduced]:
        dense = payload.to_dense()
        return backend.allreduce_sum(dense).then(lambda f: Reduced(headers.numel, dense=[(0, f.value())]))


def available() -> List[str]:
    return registry.names()


def build(name: str, **params: Any) -> Collective:
    return registry.get(name)(**params)
