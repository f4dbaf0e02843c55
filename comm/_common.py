"""Helpers shared by the comm modules (internal): index ranges, range encoding and
decoding, ordered accumulation, and the sparse reduce-scatter / range allgather that
split_allgather and oktopk are built from."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from gradsparse.buffers import reusable
from gradsparse.payload import SparsePayload

from .backend import Backend
from .wire import (
    DENSE,
    FLAG_ERROR,
    FLAG_NONFINITE,
    Headers,
    Message,
    PayloadError,
    choose_encoding,
    decode,
    encode,
    encode_dense,
    encoded_bytes,
)

__all__ = [
    "accumulate",
    "bounds",
    "check_matrix",
    "decode_all",
    "encode_ranges",
    "gather_ranges",
    "header_flags",
    "range_counts",
    "reduce_scatter_sparse",
]


def header_flags(nonfinite: bool, failed: bool) -> int:
    """A header's flags: this rank's gradient is not finite, or this rank failed."""
    return (FLAG_NONFINITE if nonfinite else 0) | (FLAG_ERROR if failed else 0)


def bounds(numel: int, parts: int) -> List[int]:
    """Equal contiguous ranges: range r is [bounds[r], bounds[r + 1])."""
    return [r * numel // parts for r in range(parts + 1)]


def range_counts(payload: SparsePayload, edges: Sequence[int]) -> List[int]:
    """How many of the payload's sorted indices fall in each range (zeros for a malformed
    payload, which the header exchange then flags)."""
    indices = payload.indices
    if indices.numel() == 0:
        return [0] * (len(edges) - 1)
    try:
        cuts = torch.tensor(list(edges), dtype=indices.dtype, device=indices.device)
        positions = torch.searchsorted(indices, cuts).tolist()
    except (RuntimeError, TypeError):
        return [0] * (len(edges) - 1)
    return [positions[r + 1] - positions[r] for r in range(len(edges) - 1)]


def encode_ranges(
    payload: SparsePayload, edges: Sequence[int], counts: Sequence[int]
) -> Tuple[torch.Tensor, List[int]]:
    """This rank's entries cut at ``edges``, each range in its cheapest encoding."""
    pieces, sizes = [], []
    start = 0
    vdt, idt = payload.values.dtype, payload.indices.dtype
    for r, count in enumerate(counts):
        lo, span = edges[r], edges[r + 1] - edges[r]
        kind = choose_encoding(count, span, vdt, idt)
        msg = encode(payload.indices[start : start + count], payload.values[start : start + count], lo, span, kind)
        pieces.append(msg)
        sizes.append(msg.numel())
        start += count
    return torch.cat(pieces), sizes


def decode_all(
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


def accumulate(messages: Sequence[Message], lo: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """Sum messages over one range into ``out`` (zeroed here), in the given order."""
    out.zero_()
    for msg in messages:
        if msg.sparse is not None:
            if msg.sparse.count:
                out.index_add_(0, msg.sparse.indices.long() - lo, msg.sparse.values.to(dtype))
        elif msg.dense is not None:
            out.add_(msg.dense.to(dtype))
    return out


def gather_ranges(
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
    return fut.then(lambda f: decode_all(f.value(), counts, spans, numel, vdt, index_dtype))


def check_matrix(headers: Headers, parts: int) -> List[List[int]]:
    """The P x P matrix of entries each rank sends to each owner, checked on every rank."""
    matrix = [row[:parts] for row in headers.extra]
    for r, row in enumerate(matrix):
        if len(row) != parts or any(c < 0 for c in row) or sum(row) != headers.counts[r]:
            raise PayloadError(f"rank {r} announced per-range counts {row} that do not add up to {headers.counts[r]}")
    return matrix


def reduce_scatter_sparse(
    payload: SparsePayload,
    backend: Backend,
    headers: Headers,
    edges: List[int],
    context: Dict[str, Any],
) -> torch.Tensor:
    """Sparse reduce-scatter: every rank sends each range's entries to that range's owner
    (an all-to-all with variable sizes, each piece in its cheapest encoding); the owner sums
    them in rank order. Returns this rank's reduced range, dense."""
    p, me, numel = backend.size, backend.rank, headers.numel
    matrix = check_matrix(headers, p)
    vdt, idt = headers.value_dtype, headers.index_dtype
    message, send_sizes = encode_ranges(payload, edges, matrix[me])
    lo, span = edges[me], edges[me + 1] - edges[me]
    incoming = [matrix[src][me] for src in range(p)]
    recv_sizes = [encoded_bytes(choose_encoding(c, span, vdt, idt), c, span, vdt, idt) for c in incoming]
    received = backend.alltoallv(message, send_sizes, recv_sizes).wait()
    messages = decode_all(received, incoming, [(lo, span)] * p, numel, vdt, idt)
    return accumulate(messages, lo, vdt, reusable(context, "range_acc", span, payload.values))
