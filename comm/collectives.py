"""Sparse collectives: every rank's payload in, the sum out, identical on all ranks.

A collective knows nothing about compressors. ``reduce`` starts the communication and
returns a future of a :class:`Reduced`, whose :meth:`Reduced.write` produces the dense sum
into a caller's buffer. Sums are always formed by our code in a fixed order (starting
from zero, adding contributions in rank order), never by the transport, so results are
bit-identical on every rank, whatever order messages arrive in, and on every backend.

Multi-round algorithms run their early rounds on the calling thread and leave only the
last round asynchronous: issuing a collective from a future's callback could order
collectives differently on different ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from gradsparse.payload import SparsePayload
from gradsparse.registry import Registry

from .backend import Backend, completed_future
from .wire import (
    DENSE,
    Headers,
    Message,
    PayloadError,
    choose_encoding,
    decode,
    encode,
    encode_dense,
    encoded_bytes,
    exchange_headers,
)

__all__ = [
    "AllgatherCollective",
    "Collective",
    "DenseCollective",
    "Reduced",
    "allreduce_dense",
    "available",
    "build",
    "registry",
]


@dataclass
class Reduced:
    """The sum across ranks as messages applied in a fixed order.

    ``kept`` is set by lossy collectives (``oktopk``): a mask over this rank's payload
    entries that made it into the sum. The caller returns the others to error feedback.
    """

    numel: int
    parts: List[Message] = field(default_factory=list)
    nonfinite: bool = False
    kept: Optional[torch.Tensor] = None

    def write(self, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Write ``scale`` times the sum into the flat ``out`` (``numel`` entries); NaN
        everywhere when any rank reported a non-finite gradient, so that AMP skips the step
        on all ranks. Scaling each contribution as it is added (the hook averages with
        ``scale = 1/P``) saves a pass over ``out``; for power-of-two P it is bit-identical
        to dividing afterwards."""
        if out.numel() != self.numel:
            raise ValueError(f"output has {out.numel()} entries, the reduction has {self.numel}")
        if self.nonfinite:
            return out.fill_(float("nan"))
        out.zero_()
        for part in self.parts:
            if part.sparse is not None:
                if part.sparse.count:
                    out.index_add_(0, part.sparse.indices, part.sparse.values.to(out.dtype), alpha=scale)
            elif part.dense is not None:
                out[part.lo : part.lo + part.dense.numel()].add_(part.dense.to(out.dtype), alpha=scale)
        return out

    def to_dense(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.write(torch.empty(self.numel, dtype=dtype, device=device))


class Collective(ABC):
    """Sum sparse payloads across the ranks of a backend.

    ``context`` is a dict the caller keeps per tensor (per bucket) across steps, for
    collectives that learn (partition boundaries, measured counts).
    """

    name: ClassVar[str] = ""
    #: False for collectives whose result drops entries (see ``Reduced.kept``)
    exact: ClassVar[bool] = True

    def reduce(
        self,
        payload: SparsePayload,
        backend: Backend,
        *,
        flags: int = 0,
        context: Optional[Dict[str, Any]] = None,
    ) -> torch.futures.Future[Reduced]:
        """Exchange headers (validated identically on every rank), then sum."""
        context = context if context is not None else {}
        headers = self._exchange(payload, backend, flags, context)
        context["mean_count"] = sum(headers.counts) / len(headers.counts)
        if headers.nonfinite:
            return completed_future(Reduced(headers.numel, nonfinite=True))
        return self._reduce(payload, backend, headers, context)

    def _exchange(self, payload: SparsePayload, backend: Backend, flags: int, context: Dict[str, Any]) -> Headers:
        del context
        return exchange_headers(backend, payload, flags)

    @abstractmethod
    def _reduce(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]: ...

    def prefers_dense(self, backend: Backend, numel: int, expected_count: int, itemsize: int, passes: float) -> bool:
        """Whether sending the whole tensor dense beats ``passes`` memory passes of
        selection plus sending about ``expected_count`` entries sparse. Only ``auto`` ever
        says yes. Every rank must call it together, with the same arguments."""
        del backend, numel, expected_count, itemsize, passes
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


registry: Registry[Type[Collective]] = Registry("collective")


def _bounds(numel: int, parts: int) -> List[int]:
    """Equal contiguous ranges: range r is [bounds[r], bounds[r + 1])."""
    return [r * numel // parts for r in range(parts + 1)]


def _split_counts(indices: torch.Tensor, bounds: Sequence[int]) -> List[int]:
    """How many of the sorted ``indices`` fall in each range."""
    if indices.numel() == 0:
        return [0] * (len(bounds) - 1)
    edges = torch.tensor(bounds, dtype=indices.dtype, device=indices.device)
    positions = torch.searchsorted(indices, edges).tolist()
    return [positions[r + 1] - positions[r] for r in range(len(bounds) - 1)]


def _encode_ranges(
    payload: SparsePayload, bounds: Sequence[int], counts: Sequence[int]
) -> Tuple[torch.Tensor, List[int]]:
    """This rank's entries cut at ``bounds``, each range in its cheapest encoding."""
    pieces, sizes = [], []
    start = 0
    vdt, idt = payload.values.dtype, payload.indices.dtype
    for r, count in enumerate(counts):
        lo, span = bounds[r], bounds[r + 1] - bounds[r]
        kind = choose_encoding(count, span, vdt, idt)
        msg = encode(payload.indices[start : start + count], payload.values[start : start + count], lo, span, kind)
        pieces.append(msg)
        sizes.append(msg.numel())
        start += count
    return torch.cat(pieces), sizes


def _decode_all(
    buffer: torch.Tensor,
    counts: Sequence[int],
    spans: Sequence[Tuple[int, int]],
    numel: int,
    value_dtype: torch.dtype,
    index_dtype: torch.dtype,
    kinds: Optional[Sequence[int]] = None,
) -> List[Message]:
    """Decode consecutive messages; message r has ``counts[r]`` entries of span
    ``spans[r] = (lo, span)`` in encoding ``kinds[r]`` (default: the cheapest one)."""
    out = []
    offset = 0
    for r, (count, (lo, span)) in enumerate(zip(counts, spans)):
        kind = kinds[r] if kinds is not None else choose_encoding(count, span, value_dtype, index_dtype)
        size = encoded_bytes(kind, count, span, value_dtype, index_dtype)
        try:
            out.append(decode(buffer[offset : offset + size], kind, count, lo, span, numel, value_dtype, index_dtype))
        except PayloadError as exc:
            raise PayloadError(f"rank(s) [{r}] sent a bad message: {exc}") from None
        offset += size
    if offset != buffer.numel():
        raise PayloadError(f"received {buffer.numel()} bytes, expected {offset}")
    return out


def _accumulate(messages: Sequence[Message], lo: int, span: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Sum messages over one range into ``out`` (zeroed here), in the given order."""
    out.zero_()
    for msg in messages:
        if msg.sparse is not None:
            if msg.sparse.count:
                out.index_add_(0, msg.sparse.indices.long() - lo, msg.sparse.values.to(dtype))
        elif msg.dense is not None:
            out.add_(msg.dense.to(dtype))
    return out


def _gather_ranges(
    backend: Backend,
    acc: torch.Tensor,
    lo: int,
    spans: Sequence[Tuple[int, int]],
    numel: int,
    index_dtype: torch.dtype,
) -> torch.futures.Future[List[Message]]:
    """Allgather every rank's reduced range ``acc`` (its sum over ``[lo, lo+len)``) in its
    cheapest encoding; a control round announces the counts first, from which every
    rank derives every encoding. Returns the decoded messages in rank order."""
    vdt = acc.dtype
    positions = torch.nonzero(acc).squeeze(1)
    count, span = positions.numel(), acc.numel()
    kind = choose_encoding(count, span, vdt, index_dtype)
    if kind == DENSE:
        message = encode_dense(acc)
    else:
        message = encode((positions + lo).to(index_dtype), acc[positions], lo, span, kind)
    table = backend.allgather_control(torch.tensor([count], dtype=torch.int64, device=acc.device))
    counts = [int(c) for c in table[:, 0].tolist()]
    for r, c in enumerate(counts):
        if not 0 <= c <= spans[r][1]:
            raise PayloadError(f"rank {r} announced {c} reduced entries for a range of {spans[r][1]}")
    sizes = [
        encoded_bytes(choose_encoding(c, s, vdt, index_dtype), c, s, vdt, index_dtype)
        for c, (_, s) in zip(counts, spans)
    ]
    fut = backend.allgatherv(message, sizes)
    return fut.then(lambda f: _decode_all(f.value(), counts, spans, numel, vdt, index_dtype))


def _workspace(context: Dict[str, Any], name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    buf = context.get(name)
    if (
        not isinstance(buf, torch.Tensor)
        or buf.numel() != numel
        or buf.dtype != like.dtype
        or buf.device != like.device
    ):
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        context[name] = buf
    return buf


@registry.register("allgather")
class AllgatherCollective(Collective):
    """Variable-length allgather of every rank's message, then a scatter-add in rank order.

    Each rank sends its message to each of the P-1 others: (P-1)·k·(4+4) bytes with int32
    indices and fp32 values (or a bitmap when that is smaller), against 2(P-1)/P·4n for a
    dense ring allreduce: it loses once P exceeds about 1/density.
    """

    name = "allgather"

    def _exchange(self, payload: SparsePayload, backend: Backend, flags: int, context: Dict[str, Any]) -> Headers:
        del context
        kind = choose_encoding(payload.count, payload.numel, payload.values.dtype, payload.indices.dtype)
        return exchange_headers(backend, payload, flags, kind=kind)

    def _reduce(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        numel = headers.numel
        if sum(headers.counts) == 0:
            return completed_future(Reduced(numel))
        me = backend.rank
        message = encode(payload.indices, payload.values, 0, numel, headers.kinds[me])
        for r, (kind, count, nbytes) in enumerate(zip(headers.kinds, headers.counts, headers.nbytes)):
            if nbytes != encoded_bytes(kind, count, numel, headers.value_dtype, headers.index_dtype):
                raise PayloadError(f"rank {r} announced {nbytes} bytes for {count} entries")
        fut = backend.allgatherv(message, headers.nbytes)
        spans = [(0, numel)] * backend.size

        def _finish(f: torch.futures.Future[torch.Tensor]) -> Reduced:
            parts = _decode_all(
                f.value(),
                headers.counts,
                spans,
                numel,
                headers.value_dtype,
                headers.index_dtype,
                headers.kinds,
            )
            return Reduced(numel, parts=parts)

        return fut.then(_finish)


def allreduce_dense(
    tensor: torch.Tensor, backend: Backend, context: Optional[Dict[str, Any]] = None
) -> torch.futures.Future[torch.Tensor]:
    """Sum a dense tensor across ranks, in place, in rank order: reduce-scatter by
    all-to-all, an ordered sum of each owned range, then an allgather. It moves the same
    2(P-1)/P·n·itemsize bytes as a ring allreduce, but its bits do not depend on the
    transport."""
    p, me = backend.size, backend.rank
    flat = tensor.view(-1)
    if p == 1:
        return completed_future(tensor)
    numel, isz = flat.numel(), flat.element_size()
    bounds = _bounds(numel, p)
    chunk = [(bounds[r + 1] - bounds[r]) * isz for r in range(p)]
    received = backend.alltoallv(flat.view(torch.uint8), chunk, [chunk[me]] * p).wait()
    span = bounds[me + 1] - bounds[me]
    pieces = received.view(flat.dtype).view(p, span)
    acc = _workspace(context if context is not None else {}, "dense_acc", span, flat)
    acc.zero_()
    for r in range(p):
        acc.add_(pieces[r])
    fut = backend.allgatherv(acc.view(torch.uint8), chunk)

    def _finish(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        flat.copy_(f.value().view(flat.dtype))
        return tensor

    return fut.then(_finish)


@registry.register("dense")
class DenseCollective(Collective):
    """Densify, then :func:`allreduce_dense`: 2(P-1)/P·n·itemsize bytes each way."""

    name = "dense"

    def _reduce(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        dense = payload.to_dense()
        return allreduce_dense(dense, backend, context).then(
            lambda f: Reduced(headers.numel, parts=[Message(0, dense=f.value())])
        )


def available() -> List[str]:
    """Names accepted by :func:`build`."""
    return registry.names()


def build(name: str, **params: Any) -> Collective:
    """Build the collective ``name`` (``auto`` takes link parameters)."""
    return registry.get(name)(**params)
