"""SparCML's sparse allreduce algorithms (Renggli, Ashkboos, Aghagolzadeh, Alistarh and
Hoefler, "SparCML: High-Performance Sparse Communication for Machine Learning", SC'19)."""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from gradsparse.payload import SparsePayload

from ._common import bounds, gather_ranges, range_counts, reduce_scatter_sparse
from .backend import Backend, completed_future
from .collectives import Collective, Reduced, registry
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

__all__ = ["RecursiveDoublingCollective", "SplitAllgatherCollective"]


@registry.register("split_allgather")
class SplitAllgatherCollective(Collective):
    """SparCML's split allgather: the index space is cut into P equal ranges; each rank
    sends each range's entries to its owner (all-to-all with variable sizes); owners sum;
    the reduced ranges are allgathered, each sparse or dense, whichever is fewer bytes.

    Per rank it sends about k(P-1)/P entries plus its reduced range to P-1 peers, instead
    of k to each of P-1 peers, and never more than a dense reduce-scatter/allgather.
    """

    name = "split_allgather"

    def exchange(self, payload: SparsePayload, backend: Backend, context: Dict[str, Any], *, flags: int) -> Headers:
        del context
        edges = bounds(payload.numel, backend.size)
        return exchange_headers(backend, payload, flags, extra=range_counts(payload, edges))

    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        numel, p, counts = headers.numel, backend.size, tuple(headers.counts)
        if sum(counts) == 0:
            return completed_future(Reduced(numel, counts=counts))
        edges = bounds(numel, p)
        acc = reduce_scatter_sparse(payload, backend, headers, edges, context)
        spans = [(edges[r], edges[r + 1] - edges[r]) for r in range(p)]
        fut = gather_ranges(backend, acc, edges[backend.rank], spans, numel, headers.index_dtype)
        return fut.then(lambda f: Reduced(numel, parts=f.value(), counts=counts))


def _merge(a: Message, b: Message, numel: int, index_dtype: torch.dtype) -> Message:
    """The sum of two partial results. Symmetric to the bit: merge(a, b) == merge(b, a),
    since each entry is 0 + a + b or 0 + b + a and addition commutes; so partners that
    merge each other's results hold identical bits."""
    if a.dense is not None or b.dense is not None:
        dense_parts = [m.dense for m in (a, b) if m.dense is not None]
        out = dense_parts[0].clone() if len(dense_parts) == 1 else dense_parts[0] + dense_parts[1]
        for m in (a, b):
            if m.sparse is not None and m.sparse.count:
                out.index_add_(0, m.sparse.indices, m.sparse.values)
        return Message(0, dense=out)
    assert a.sparse is not None and b.sparse is not None
    indices = torch.cat([a.sparse.indices, b.sparse.indices])
    values = torch.cat([a.sparse.values, b.sparse.values])
    order = torch.sort(indices, stable=True).indices
    unique, inverse = torch.unique_consecutive(indices[order], return_inverse=True)
    summed = torch.zeros(unique.numel(), dtype=values.dtype, device=values.device)
    summed.index_add_(0, inverse, values[order])
    if choose_encoding(unique.numel(), numel, values.dtype, index_dtype) == DENSE:
        dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
        dense[unique.long()] = summed
        return Message(0, dense=dense)
    return Message(0, sparse=SparsePayload(unique.to(index_dtype), summed, numel))


@registry.register("recursive_doubling")
class RecursiveDoublingCollective(Collective):
    """SparCML's SSAR/DSAR recursive doubling: log2(P) rounds of pairwise exchange and
    merge. The partial sum goes dense once that is fewer bytes (the break-even density is
    itemsize / (itemsize + 4): one half for fp32). For P not a power of two, the ranks past
    the largest power of two first fold their payload into a partner and get the result
    back at the end, so any P works."""

    name = "recursive_doubling"

    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        numel, p, me, counts = headers.numel, backend.size, backend.rank, tuple(headers.counts)
        if sum(counts) == 0:
            return completed_future(Reduced(numel, counts=counts))
        vdt, idt = headers.value_dtype, headers.index_dtype
        current = Message(0, sparse=payload)
        p2 = 1 << (p.bit_length() - 1)
        extra = p - p2
        device = payload.values.device
        if me >= p2:  # fold into a partner, then wait for the result
            self._send(backend, current, me - p2, numel, vdt, idt)
            current = self._recv(backend, me - p2, numel, vdt, idt, device)
            return completed_future(Reduced(numel, parts=[current], counts=counts))
        if me < extra:
            current = _merge(current, self._recv(backend, me + p2, numel, vdt, idt, device), numel, idt)
        mask = 1
        while mask < p2:
            theirs = self._swap(backend, current, me ^ mask, numel, vdt, idt)
            current = _merge(current, theirs, numel, idt)
            mask <<= 1
        if me < extra:
            self._send(backend, current, me + p2, numel, vdt, idt)
        return completed_future(Reduced(numel, parts=[current], counts=counts))

    @staticmethod
    def _encode(msg: Message, numel: int, index_dtype: torch.dtype) -> torch.Tensor:
        if msg.dense is not None:
            return encode_dense(msg.dense)
        assert msg.sparse is not None
        kind = choose_encoding(msg.sparse.count, numel, msg.sparse.values.dtype, index_dtype)
        return encode(msg.sparse.indices, msg.sparse.values, 0, numel, kind)

    @staticmethod
    def _header(msg: Message, numel: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> torch.Tensor:
        if msg.dense is not None:
            return torch.tensor([DENSE, numel], dtype=torch.int64)
        assert msg.sparse is not None
        return torch.tensor(
            [choose_encoding(msg.sparse.count, numel, value_dtype, index_dtype), msg.sparse.count],
            dtype=torch.int64,
        )

    def _swap(
        self, backend: Backend, msg: Message, peer: int, numel: int, vdt: torch.dtype, idt: torch.dtype
    ) -> Message:
        header = self._header(msg, numel, vdt, idt).to(self._device(msg))
        theirs = backend.sendrecv_control(header, peer, 2).tolist()
        size = self._size(theirs, numel, vdt, idt, peer)
        data = backend.sendrecv(self._encode(msg, numel, idt), peer, size)
        return self._decode(data, theirs, numel, vdt, idt)

    def _send(self, backend: Backend, msg: Message, peer: int, numel: int, vdt: torch.dtype, idt: torch.dtype) -> None:
        backend.sendrecv_control(self._header(msg, numel, vdt, idt).to(self._device(msg)), peer, 0)
        backend.sendrecv(self._encode(msg, numel, idt), peer, 0)

    def _recv(
        self,
        backend: Backend,
        peer: int,
        numel: int,
        vdt: torch.dtype,
        idt: torch.dtype,
        device: torch.device,
    ) -> Message:
        theirs = backend.sendrecv_control(torch.empty(0, dtype=torch.int64, device=device), peer, 2).tolist()
        size = self._size(theirs, numel, vdt, idt, peer)
        data = backend.sendrecv(torch.empty(0, dtype=torch.uint8, device=device), peer, size)
        return self._decode(data, theirs, numel, vdt, idt)

    @staticmethod
    def _device(msg: Message) -> torch.device:
        tensor = msg.dense if msg.dense is not None else msg.sparse.values  # type: ignore[union-attr]
        return tensor.device

    @staticmethod
    def _size(header: List[int], numel: int, vdt: torch.dtype, idt: torch.dtype, peer: int) -> int:
        kind, count = header
        if kind not in (0, 1, 2) or not 0 <= count <= numel:
            raise PayloadError(f"rank {peer} announced {count} entries in encoding {kind} for a tensor of {numel}")
        return encoded_bytes(kind, count, numel, vdt, idt)

    @staticmethod
    def _decode(data: torch.Tensor, header: List[int], numel: int, vdt: torch.dtype, idt: torch.dtype) -> Message:
        kind, count = header
        return decode(data, kind, count, 0, numel, numel, vdt, idt)
