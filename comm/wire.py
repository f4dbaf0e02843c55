"""Wire format of sparse payloads and the per-call header every rank exchanges first.

A rank's message is ``[indices | pad | values | pad]`` as raw bytes, each part padded to
8 bytes so that every part can be viewed in place with its dtype; indices and values
travel in one message. The header (numel, count, dtypes, flags) is gathered
from all ranks before any payload moves; since every rank sees the same headers, every
rank reaches the same verdict on a bad or mismatched peer and raises the same error
instead of hanging or corrupting the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from gradsparse.payload import SparsePayload

from .backend import Backend

__all__ = [
    "FLAG_NONFINITE",
    "FLAG_ERROR",
    "Headers",
    "PeerError",
    "PayloadError",
    "exchange_headers",
    "pack",
    "unpack",
    "segment_bytes",
]

FLAG_NONFINITE = 1
FLAG_ERROR = 2
_FLAGS_KNOWN = FLAG_NONFINITE | FLAG_ERROR
_HEADER_LEN = 5
_VALUE_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES: Tuple[torch.dtype, ...] = (torch.int32, torch.int64)
_ALIGN = 8


class PayloadError(ValueError):
    """A payload (this rank's or a peer's) is malformed or does not match its peers."""


class PeerError(RuntimeError):
    """Another rank failed before it could send its payload."""


@dataclass(frozen=True)
class Headers:
    numel: int
    counts: List[int]
    flags: List[int]
    value_dtype: torch.dtype
    index_dtype: torch.dtype

    @property
    def nonfinite(self) -> bool:
        return any(f & FLAG_NONFINITE for f in self.flags)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def segment_bytes(count: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    return _aligned(count * index_dtype.itemsize) + _aligned(count * value_dtype.itemsize)


def exchange_headers(backend: Backend, payload: SparsePayload, flags: int = 0) -> Headers:
    """Gather every rank's header and validate them together (raises on every rank)."""
    local = torch.tensor(
        [
            payload.numel,
            payload.count,
            _code(_VALUE_DTYPES, payload.values.dtype, "values"),
            _code(_INDEX_DTYPES, payload.indices.dtype, "indices"),
            flags,
        ],
        dtype=torch.int64,
        device=payload.values.device,
    )
    table = backend.allgather_control(local).cpu().tolist()
    failed = [r for r, row in enumerate(table) if row[4] & FLAG_ERROR]
    if failed:
        raise PeerError(
            f"rank(s) {failed} failed before sending their gradient payload; this rank "
            f"({backend.rank}) stops too. See the failing rank's log for the cause."
        )
    problems = []
    numels = [row[0] for row in table]
    if len(set(numels)) != 1:
        problems.append(f"numel differs across ranks: {numels}")
    for r, (numel, count, vcode, icode, flag) in enumerate(table):
        if not 0 <= count <= max(numel, 0):
            problems.append(f"rank {r} announced {count} entries for a tensor of {numel}")
        if not (0 <= vcode < len(_VALUE_DTYPES) and 0 <= icode < len(_INDEX_DTYPES)):
            problems.append(f"rank {r} sent unknown dtype codes ({vcode}, {icode})")
        if flag & ~_FLAGS_KNOWN:
            problems.append(f"rank {r} sent unknown flags {flag:#x}")
    if not problems and len({(row[2], row[3]) for row in table}) != 1:
        problems.append(
            "value/index dtypes differ across ranks: "
            + str([(_VALUE_DTYPES[row[2]], _INDEX_DTYPES[row[3]]) for row in table])
        )
    if problems:
        raise PayloadError("sparse collective refused mismatched payloads: " + "; ".join(problems))
    return Headers(
        numel=numels[0],
        counts=[row[1] for row in table],
        flags=[row[4] for row in table],
        value_dtype=_VALUE_DTYPES[table[0][2]],
        index_dtype=_INDEX_DTYPES[table[0][3]],
    )


def _code(options: Tuple[torch.dtype, ...], dtype: torch.dtype, what: str) -> int:
    if dtype not in options:
        raise PayloadError(f"payload {what} dtype {dtype} is not supported; expected one of {list(options)}")
    return options.index(dtype)


def pack(payload: SparsePayload) -> torch.Tensor:
    """This rank's message as bytes: indices, then values, each zero-padded to 8 bytes."""
    parts = []
    for t in (payload.indices, payload.values):
        raw = t.contiguous().view(torch.uint8)
        parts.append(raw)
        pad = _aligned(raw.numel()) - raw.numel()
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
    return torch.cat(parts)


def unpack(buffer: torch.Tensor, counts: Sequence[int], headers: Headers) -> List[SparsePayload]:
    """Split the concatenated messages of all ranks and check every index is in range."""
    sizes = [segment_bytes(c, headers.value_dtype, headers.index_dtype) for c in counts]
    if buffer.numel() != sum(sizes):
        raise PayloadError(
            f"received {buffer.numel()} bytes, expected {sum(sizes)} from counts {list(counts)}"
        )
    out = []
    offset = 0
    isz = headers.index_dtype.itemsize
    for count, size in zip(counts, sizes):
        seg = buffer[offset : offset + size]
        start = _aligned(count * isz)
        indices = seg[: count * isz].view(headers.index_dtype)
        values = seg[start : start + count * headers.value_dtype.itemsize].view(headers.value_dtype)
        out.append(SparsePayload(indices, values, headers.numel))
        offset += size
    _check_indices(out, headers.numel)
    return out


def _check_indices(parts: Sequence[SparsePayload], numel: int) -> None:
    nonempty = [p.indices for p in parts if p.count]
    if not nonempty:
        return
    lo = min(int(t.min()) for t in nonempty)
    hi = max(int(t.max()) for t in nonempty)
    if lo < 0 or hi >= numel:
        bad = [
            r
            for r, p in enumerate(parts)
            if p.count and (int(p.indices.min()) < 0 or int(p.indices.max()) >= numel)
        ]
        raise PayloadError(f"rank(s) {bad} sent indices outside [0, {numel}) (range seen [{lo}, {hi}])")
