"""Sparse collectives: every rank's payload in, the sum out, identical on all ranks.

A collective knows nothing about compressors or hooks. :meth:`Collective.reduce` runs in
two public phases: :meth:`Collective.exchange` gathers and validates every rank's header
(so a malformed or mismatched peer is an error on every rank), then
:meth:`Collective.combine` moves the payloads and returns a future of a :class:`Reduced`,
whose :meth:`Reduced.write` produces the dense sum into a caller's buffer.
:meth:`Collective.reduce_dense` is the one dense path, for tensors sent whole.

Sums are formed by our code in a fixed order (from zero, adding contributions in rank
order), never by the transport, so results are bit-identical on every rank, whatever
order messages arrive in, and on every backend. Multi-round algorithms run their early
rounds on the calling thread and leave only the last round asynchronous: issuing a
collective from a future's callback could order collectives differently on different ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch

from gradsparse import kernels
from gradsparse.buffers import reusable
from gradsparse.payload import SparsePayload, index_dtype_for
from gradsparse.registry import Registry

from . import fixed
from ._common import bounds, decode_all, header_flags
from .backend import Backend, completed_future
from .cost import SparseCost
from .wire import (
    FLAG_ERROR,
    FLAG_NONFINITE,
    LIST,
    Headers,
    Message,
    PayloadError,
    check_payload,
    choose_encoding,
    encode,
    encoded_bytes,
    exchange_headers,
)

__all__ = [
    "AllgatherCollective",
    "Collective",
    "DenseCollective",
    "Reduced",
    "allreduce_ordered",
    "available",
    "build",
    "registry",
]


@dataclass
class Reduced:
    """The sum across ranks as messages applied in a fixed order.

    ``counts`` are every rank's payload counts, as the headers announced them. ``kept`` is
    set by lossy collectives (``oktopk``): a mask over this rank's payload entries that made
    it into the sum; the caller returns the others to error feedback.
    """

    numel: int
    parts: List[Message] = field(default_factory=list)
    nonfinite: bool = False
    kept: Optional[torch.Tensor] = None
    counts: Tuple[int, ...] = ()

    def write(self, out: torch.Tensor, scale: float = 1.0, *, zeroed: bool = False) -> torch.Tensor:
        """Write ``scale`` times the sum into the flat ``out`` (``numel`` entries); NaN
        everywhere when any rank reported a non-finite gradient, so that AMP skips the step
        on all ranks. Scaling each contribution as it is added (the hook averages with
        ``scale = 1/P``) saves a pass over ``out``; for power-of-two P it is bit-identical
        to dividing afterwards. ``zeroed``: the caller has zeroed ``out`` wherever it will
        read the sum, so it is not filled again: the sum is added into it."""
        if out.numel() != self.numel:
            raise ValueError(f"output has {out.numel()} entries, the reduction has {self.numel}")
        if self.nonfinite:
            return out.fill_(float("nan"))
        lists = [(p.sparse.indices, p.sparse.values) for p in self.parts if p.sparse is not None]
        if len(lists) == len(self.parts) and kernels.scatter_sum(out, lists, scale, zeroed=zeroed):
            return out  # a compiled loop (numba): the same sums in the same order
        if not zeroed:
            out.zero_()
        for part in self.parts:
            if part.sparse is not None:
                if part.sparse.count:
                    out.index_add_(0, part.sparse.indices, part.sparse.values.to(out.dtype), alpha=scale)
            elif part.dense is not None:
                out[part.lo : part.lo + part.dense.numel()].add_(part.dense.to(out.dtype), alpha=scale)
        return out


class Collective(ABC):
    """Sum sparse payloads across the ranks of a backend.

    ``context`` is a dict the caller keeps per tensor across steps and never reads: it
    belongs to the collective, for what it learns (partition boundaries) and its buffers.
    """

    name: ClassVar[str] = ""
    #: False for collectives whose result drops entries (see ``Reduced.kept``)
    exact: ClassVar[bool] = True

    def reduce(
        self,
        payload: SparsePayload,
        backend: Backend,
        *,
        context: Optional[Dict[str, Any]] = None,
        nonfinite: bool = False,
        failed: bool = False,
        count: Optional[int] = None,
    ) -> torch.futures.Future[Reduced]:
        """Sum every rank's payload. ``nonfinite``: this rank's gradient holds NaN/inf (the
        result is NaN everywhere); ``failed``: this rank could not build its payload (every
        other rank raises :class:`PeerError`). ``count``: how many entries every rank sends,
        when every rank knows it without looking at the data (a compressor with an exact
        budget); a collective that can use it skips the header exchange
        (:meth:`reduce_known`) from the second call with the same ``context`` on: the first
        exchanges headers, which checks that every rank sends that many entries of the same
        tensor. Every rank must call it together, with the same ``count``."""
        context = context if context is not None else {}
        agreed = (payload.numel, count, payload.values.dtype)
        if count is not None and context.get("agreed_count") == agreed:
            known = self.reduce_known(payload, backend, count, context, flags=header_flags(nonfinite, failed))
            if known is not None:
                return known
        headers = self.exchange(payload, backend, context, flags=header_flags(nonfinite, failed))
        if count is not None and not any(headers.flags) and headers.counts == [count] * len(headers.counts):
            # every rank validated that every rank sends ``count`` entries of this tensor:
            # from the next call on, the header exchange may be skipped
            context["agreed_count"] = agreed
        if headers.nonfinite:
            return completed_future(Reduced(headers.numel, nonfinite=True, counts=tuple(headers.counts)))
        return self.combine(payload, backend, headers, context)

    def exchange(self, payload: SparsePayload, backend: Backend, context: Dict[str, Any], *, flags: int) -> Headers:
        """Gather every rank's header (phase one); collectives add what they need to it."""
        del context
        return exchange_headers(backend, payload, flags)

    @abstractmethod
    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        """Move the payloads and sum them (phase two), given the exchanged headers."""

    def reduce_known(
        self, payload: SparsePayload, backend: Backend, count: int, context: Dict[str, Any], *, flags: int
    ) -> Optional[torch.futures.Future[Reduced]]:
        """The sum without a header exchange, when every rank sends ``count`` entries; None
        when this collective has no such path for them (the default): then the caller
        exchanges headers. Every rank must decide alike from ``count`` and the payload's
        size and dtypes. Errors (a failed or mismatched peer) are raised from the future,
        on every rank, never before the messages are out."""
        del payload, backend, count, context, flags
        return None

    def reduce_dense(
        self,
        tensor: torch.Tensor,
        backend: Backend,
        *,
        validate: bool = True,
        failed: bool = False,
        rank_order: bool = False,
    ) -> torch.futures.Future[torch.Tensor]:
        """Sum a whole flat tensor in place: the one dense path.

        With ``validate``, the ranks first exchange headers, so that a failed rank or a
        mismatched size or dtype is an error on every rank; leave it off only for a tensor
        whose step another validated exchange already covers. By default the sum is the
        transport's own allreduce where it has one (as fast as DDP's; its bits depend on the
        transport and on where each entry sits in the tensor). ``rank_order`` sums in rank
        order instead (:func:`allreduce_ordered`): the same bits on every transport and for
        any layout, at the same byte count. NaN/inf travel in the sum."""
        if validate:
            exchange_headers(backend, SparsePayload.empty(tensor.numel(), tensor), header_flags(False, failed))
        native = None if rank_order else backend.allreduce_native(tensor)
        return native if native is not None else allreduce_ordered(tensor, backend)

    def prefers_dense(self, backend: Backend, cost: SparseCost) -> bool:
        """Whether sending the whole tensor dense beats the sparse ``cost``. Only ``auto`` ever says
        yes. Every rank must call it together, with the same arguments."""
        del backend, cost
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


registry: Registry[Type[Collective]] = Registry("collective")


@registry.register("allgather")
class AllgatherCollective(Collective):
    """Variable-length allgather of every rank's message, then a scatter-add in rank order.

    Each rank sends its message to each of the P-1 others: (P-1)·k·(4+4) bytes with int32
    indices and fp32 values (or a bitmap when that is smaller), against 2(P-1)/P·4n for a
    dense ring allreduce: it loses once P exceeds about 1/density.
    """

    name = "allgather"

    def exchange(self, payload: SparsePayload, backend: Backend, context: Dict[str, Any], *, flags: int) -> Headers:
        del context
        kind = choose_encoding(payload.count, payload.numel, payload.values.dtype, payload.indices.dtype)
        return exchange_headers(backend, payload, flags, kind=kind)

    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        numel, counts = headers.numel, tuple(headers.counts)
        if sum(counts) == 0:
            return completed_future(Reduced(numel, counts=counts))
        message = encode(payload.indices, payload.values, 0, numel, headers.kinds[backend.rank])
        for r, (kind, count, nbytes) in enumerate(zip(headers.kinds, counts, headers.nbytes)):
            if nbytes != encoded_bytes(kind, count, numel, headers.value_dtype, headers.index_dtype):
                raise PayloadError(f"rank {r} announced {nbytes} bytes for {count} entries")
        fut = backend.allgatherv(message, headers.nbytes)
        spans = [(0, numel)] * backend.size

        def _decode(f: torch.futures.Future[torch.Tensor]) -> Reduced:
            vdt, idt = headers.value_dtype, headers.index_dtype
            parts = decode_all(f.value(), counts, spans, numel, vdt, idt, headers.kinds)
            return Reduced(numel, parts=parts, counts=counts)

        return fut.then(_decode)

    def reduce_known(
        self, payload: SparsePayload, backend: Backend, count: int, context: Dict[str, Any], *, flags: int
    ) -> Optional[torch.futures.Future[Reduced]]:
        """One equal-size allgather of ``[flag word | numel, count, dtypes | count indices |
        count values]`` (:func:`gradsparse.comm.fixed.gather_fixed`): the same bytes as the
        list encoding, without the blocking header round trip before it. Only where the
        list is the encoding :meth:`exchange` would choose (low densities)."""
        numel, values_dtype = payload.numel, payload.values.dtype
        index_dtype = index_dtype_for(numel)
        if not count or choose_encoding(count, numel, values_dtype, index_dtype) != LIST:
            return None
        problem = None if flags else check_payload(payload)
        if problem is None and not flags and (payload.count != count or payload.indices.dtype != index_dtype):
            problem = f"an exact budget of {count} entries was announced, but the payload holds {payload.count}"
        if flags or problem is not None:
            flags |= FLAG_ERROR if problem is not None else 0
            indices = torch.zeros(count, dtype=index_dtype, device=payload.values.device)
            payload = SparsePayload(indices, torch.zeros(count, dtype=values_dtype, device=indices.device), numel)
        flag = torch.tensor(flags, dtype=torch.int64, device=payload.values.device)
        me = backend.rank

        def _sum(fut: torch.futures.Future[fixed.Gathered]) -> Reduced:
            gathered = fut.value()
            words = gathered.flags.tolist()
            if problem is not None:
                raise PayloadError(f"rank {me} refused to send its payload: {problem}")
            fixed.check_words(words)
            counts = (count,) * len(words)
            if any(w & FLAG_NONFINITE for w in words):
                return Reduced(numel, nonfinite=True, counts=counts)
            parts = []
            for r, (idx, vals) in enumerate(zip(gathered.indices, gathered.values)):
                low, high = (int(b) for b in torch.aminmax(idx))
                if low < 0 or high >= numel:
                    seen = f"indices outside [0, {numel}) (seen [{low}, {high}])"
                    raise PayloadError(f"rank(s) [{r}] sent a bad message: {seen}")
                parts.append(Message(0, sparse=SparsePayload(idx, vals, numel)))
            return Reduced(numel, parts=parts, counts=counts)

        return fixed.gather_fixed(backend, payload.values, payload.indices, flag, numel, context).then(_sum)


def allreduce_ordered(
    tensor: torch.Tensor, backend: Backend, context: Optional[Dict[str, Any]] = None
) -> torch.futures.Future[torch.Tensor]:
    """Sum a dense tensor across ranks, in place, in rank order: reduce-scatter by
    all-to-all, an ordered sum of each owned range, then an allgather. It moves the same
    2(P-1)/P·n·itemsize bytes as a ring allreduce, but its bits do not depend on the
    transport. For two ranks, one allgather of the whole tensor moves those bytes too,
    and nothing waits on the calling thread: the sum is formed when it arrives."""
    p, me = backend.size, backend.rank
    flat = tensor.view(-1)
    if p == 1:
        return completed_future(tensor)
    if p == 2:

        def _sum(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            pieces = f.value().view(p, -1)
            # (0 + a) + b, the ordered sum below, differs from a + b only where both are -0.0,
            # which it makes +0.0: so does adding 0.0 afterwards, leaving all else as it is
            torch.add(pieces[0], pieces[1], out=flat).add_(0.0)
            return tensor

        return backend.allgather(flat).then(_sum)
    numel, isz = flat.numel(), flat.element_size()
    edges = bounds(numel, p)
    chunk = [(edges[r + 1] - edges[r]) * isz for r in range(p)]
    received = backend.alltoallv(flat.view(torch.uint8), chunk, [chunk[me]] * p).wait()
    span = edges[me + 1] - edges[me]
    pieces = received.view(flat.dtype).view(p, span)
    acc = reusable(context if context is not None else {}, "dense_acc", span, flat)
    acc.zero_()
    for r in range(p):
        acc.add_(pieces[r])
    fut = backend.allgatherv(acc.view(torch.uint8), chunk)

    def _copy_back(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        flat.copy_(f.value().view(flat.dtype))
        return tensor

    return fut.then(_copy_back)


@registry.register("dense")
class DenseCollective(Collective):
    """Densify, then :func:`allreduce_ordered`: 2(P-1)/P·n·itemsize bytes each way."""

    name = "dense"

    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        dense = payload.to_dense()
        counts = tuple(headers.counts)
        return allreduce_ordered(dense, backend, context).then(
            lambda f: Reduced(headers.numel, parts=[Message(0, dense=f.value())], counts=counts)
        )


def available() -> List[str]:
    """Names accepted by :func:`build`."""
    return registry.names()


def build(name: str, **params: Any) -> Collective:
    """Build the collective ``name`` (``auto`` takes link parameters)."""
    return registry.get(name)(**params)
