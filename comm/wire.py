"""Wire format: message encodings and the header every rank exchanges first.

A message carries the entries of one index span ``[lo, lo + span)`` in one of three
encodings, whichever is fewest bytes:

* ``LIST``: int32 (int64 past 2**31 entries) indices, then values;
* ``BITMAP``: one bit per position of the span (span/8 bytes), then values;
* ``DENSE``: the values of every position of the span.

Each part is zero-padded to 8 bytes so that it can be viewed in place with its dtype.

Before any payload moves, every rank gathers every rank's header (numel, count, dtypes,
flags, encoding, bytes, plus algorithm-specific integers). Every rank validates the same
table, so a mismatched or malformed peer makes every rank raise the same error instead of
hanging or corrupting the sum. A rank that failed locally sets ``FLAG_ERROR`` so that its
peers raise :class:`PeerError` rather than wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from gradsparse.payload import SparsePayload

from .backend import Backend

__all__ = [
    "BITMAP",
    "DENSE",
    "FLAG_ERROR",
    "FLAG_NONFINITE",
    "LIST",
    "Headers",
    "Message",
    "PayloadError",
    "PeerError",
    "check_payload",
    "choose_encoding",
    "decode",
    "encode",
    "encode_dense",
    "encoded_bytes",
    "exchange_headers",
]

FLAG_NONFINITE = 1
FLAG_ERROR = 2
_FLAGS_KNOWN = FLAG_NONFINITE | FLAG_ERROR
LIST, BITMAP, DENSE = 0, 1, 2
_KINDS = (LIST, BITMAP, DENSE)
_VALUE_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES: Tuple[torch.dtype, ...] = (torch.int32, torch.int64)
_ALIGN = 8
_FIXED = 7  # numel, count, value dtype, index dtype, flags, encoding, bytes


class PayloadError(ValueError):
    """A payload (this rank's or a peer's) is malformed or does not match its peers."""


class PeerError(RuntimeError):
    """Another rank failed before it could send its payload."""


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def encoded_bytes(kind: int, count: int, span: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    """Size of a message of ``count`` entries of a ``span`` in encoding ``kind``."""
    if kind == LIST:
        return _aligned(count * index_dtype.itemsize) + _aligned(count * value_dtype.itemsize)
    if kind == BITMAP:
        return _aligned(-(-span // 8)) + _aligned(count * value_dtype.itemsize)
    if kind == DENSE:
        return _aligned(span * value_dtype.itemsize)
    raise PayloadError(f"unknown message encoding {kind}; expected one of {list(_KINDS)}")


def choose_encoding(count: int, span: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    """The encoding with the fewest bytes (ties prefer the index list, then the bitmap)."""
    return min(_KINDS, key=lambda k: (encoded_bytes(k, count, span, value_dtype, index_dtype), k))


@dataclass(frozen=True)
class Message:
    """A decoded message: a sparse part, or a dense run of values at ``lo``."""

    lo: int
    sparse: Optional[SparsePayload] = None
    dense: Optional[torch.Tensor] = None


def _pad(raw: torch.Tensor) -> List[torch.Tensor]:
    pad = _aligned(raw.numel()) - raw.numel()
    return [raw] if not pad else [raw, torch.zeros(pad, dtype=torch.uint8, device=raw.device)]


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def encode(indices: torch.Tensor, values: torch.Tensor, lo: int, span: int, kind: int) -> torch.Tensor:
    """The bytes of a message; ``indices`` are absolute, sorted and unique."""
    device = values.device
    if kind == LIST:
        parts = _pad(indices.contiguous().view(torch.uint8)) + _pad(values.contiguous().view(torch.uint8))
    elif kind == BITMAP:
        if device.type == "cpu":  # NumPy packs bits several times faster than tensor ops
            bits_np = np.zeros(span, dtype=np.bool_)
            bits_np[(indices.long() - lo).numpy()] = True
            packed = torch.from_numpy(np.packbits(bits_np, bitorder="little"))
        else:
            bits = torch.zeros(-(-span // 8) * 8, dtype=torch.uint8, device=device)
            bits[indices.long() - lo] = 1
            weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)
            packed = (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
        parts = _pad(packed) + _pad(values.contiguous().view(torch.uint8))
    elif kind == DENSE:
        dense = torch.zeros(span, dtype=values.dtype, device=device)
        dense[indices.long() - lo] = values
        parts = _pad(dense.view(torch.uint8))
    else:
        raise PayloadError(f"unknown message encoding {kind}")
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def encode_dense(values: torch.Tensor) -> torch.Tensor:
    """A ``DENSE`` message of a whole span, without a scatter."""
    parts = _pad(values.contiguous().view(torch.uint8))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def decode(
    buf: torch.Tensor,
    kind: int,
    count: int,
    lo: int,
    span: int,
    numel: int,
    value_dtype: torch.dtype,
    index_dtype: torch.dtype,
) -> Message:
    """Parse one message, checking its size and that every index lies in its span."""
    expected = encoded_bytes(kind, count, span, value_dtype, index_dtype)
    if buf.numel() != expected:
        raise PayloadError(f"message of {buf.numel()} bytes, expected {expected} for {count} entries")
    vsize = value_dtype.itemsize
    if kind == DENSE:
        return Message(lo, dense=buf[: span * vsize].view(value_dtype))
    if kind == LIST:
        start = _aligned(count * index_dtype.itemsize)
        indices = buf[: count * index_dtype.itemsize].view(index_dtype)
        values = buf[start : start + count * vsize].view(value_dtype)
        if count and (int(indices.min()) < lo or int(indices.max()) >= lo + span):
            raise PayloadError(
                f"message indices lie outside [{lo}, {lo + span}) "
                f"(range seen [{int(indices.min())}, {int(indices.max())}])"
            )
    else:
        nbytes = -(-span // 8)
        if buf.device.type == "cpu":
            unpacked = np.unpackbits(buf[:nbytes].numpy(), count=span, bitorder="little")
            positions = torch.from_numpy(np.flatnonzero(unpacked))
        else:
            shifts = torch.arange(8, dtype=torch.uint8, device=buf.device)
            bits = (buf[:nbytes].unsqueeze(1) >> shifts) & 1
            positions = torch.nonzero(bits.reshape(-1)[:span]).squeeze(1)
        if positions.numel() != count:
            raise PayloadError(f"bitmap holds {positions.numel()} entries, the header says {count}")
        indices = (positions + lo).to(index_dtype)
        start = _aligned(nbytes)
        values = buf[start : start + count * vsize].view(value_dtype)
    return Message(lo, sparse=SparsePayload(indices, values, numel))


def check_payload(payload: SparsePayload) -> Optional[str]:
    """Why this rank's payload cannot be sent (None when it can). Checked before the
    header exchange, so that a bad local payload becomes an error on every rank."""
    try:
        payload.validate()
    except ValueError as exc:
        return str(exc)
    if payload.values.dtype not in _VALUE_DTYPES:
        return f"payload values dtype {payload.values.dtype} is not supported; expected {list(_VALUE_DTYPES)}"
    if payload.indices.dtype not in _INDEX_DTYPES:
        return f"payload indices dtype {payload.indices.dtype} is not supported; expected {list(_INDEX_DTYPES)}"
    if payload.count > 1 and not bool((payload.indices[1:] > payload.indices[:-1]).all()):
        return "payload indices must be sorted ascending and unique"
    return None


@dataclass(frozen=True)
class Headers:
    """Every rank's header, identical on all ranks after the exchange."""

    numel: int
    counts: List[int]
    flags: List[int]
    kinds: List[int]
    nbytes: List[int]
    extra: List[List[int]]
    value_dtype: torch.dtype
    index_dtype: torch.dtype

    @property
    def nonfinite(self) -> bool:
        return any(f & FLAG_NONFINITE for f in self.flags)


def exchange_headers(
    backend: Backend,
    payload: SparsePayload,
    flags: int = 0,
    *,
    kind: int = LIST,
    nbytes: Optional[int] = None,
    extra: Sequence[int] = (),
) -> Headers:
    """Gather every rank's header and validate them together (raises on every rank)."""
    problem = None if flags & FLAG_ERROR else check_payload(payload)
    if problem is not None:
        flags |= FLAG_ERROR
    vdt, idt = payload.values.dtype, payload.indices.dtype
    if nbytes is None:
        nbytes = encoded_bytes(kind, payload.count, payload.numel, vdt, idt) if not flags & FLAG_ERROR else 0
    local = torch.tensor(
        [
            payload.numel,
            payload.count,
            _VALUE_DTYPES.index(vdt) if vdt in _VALUE_DTYPES else -1,
            _INDEX_DTYPES.index(idt) if idt in _INDEX_DTYPES else -1,
            flags,
            kind,
            nbytes,
            *extra,
        ],
        dtype=torch.int64,
        device=payload.values.device,
    )
    table = backend.allgather_control(local).cpu().tolist()
    if problem is not None:
        raise PayloadError(f"rank {backend.rank} refused to send its payload: {problem}")
    failed = [r for r, row in enumerate(table) if row[4] & FLAG_ERROR]
    if failed:
        raise PeerError(
            f"rank(s) {failed} failed before sending their gradient payload; this rank "
            f"({backend.rank}) stops too. See the failing rank's log for the cause."
        )
    _validate_table(table)
    return Headers(
        numel=table[0][0],
        counts=[row[1] for row in table],
        flags=[row[4] for row in table],
        kinds=[row[5] for row in table],
        nbytes=[row[6] for row in table],
        extra=[row[_FIXED:] for row in table],
        value_dtype=_VALUE_DTYPES[table[0][2]],
        index_dtype=_INDEX_DTYPES[table[0][3]],
    )


def _validate_table(table: List[List[int]]) -> None:
    problems = []
    numels = [row[0] for row in table]
    if len(set(numels)) != 1:
        problems.append(f"numel differs across ranks: {numels}")
    for r, row in enumerate(table):
        numel, count, vcode, icode, flag, kind, nbytes = row[:_FIXED]
        if not 0 <= count <= max(numel, 0):
            problems.append(f"rank {r} announced {count} entries for a tensor of {numel}")
        if not (0 <= vcode < len(_VALUE_DTYPES) and 0 <= icode < len(_INDEX_DTYPES)):
            problems.append(f"rank {r} sent unknown dtype codes ({vcode}, {icode})")
        if flag & ~_FLAGS_KNOWN:
            problems.append(f"rank {r} sent unknown flags {flag:#x}")
        if kind not in _KINDS:
            problems.append(f"rank {r} sent unknown encoding {kind}")
        if nbytes < 0:
            problems.append(f"rank {r} announced a negative message size {nbytes}")
    if not problems and len({(row[2], row[3]) for row in table}) != 1:
        problems.append(
            "value/index dtypes differ across ranks: "
            + str([(_VALUE_DTYPES[row[2]], _INDEX_DTYPES[row[3]]) for row in table])
        )
    if not problems and len({len(row) for row in table}) != 1:
        problems.append("header lengths differ across ranks")
    if problems:
        raise PayloadError("sparse collective refused mismatched payloads: " + "; ".join(problems))
