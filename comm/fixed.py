"""Fixed-size sparse messages, for devices where the host must not wait (GPUs, NCCL).

Every rank sends exactly k values (and, unless the indices are shared, k indices), with a
header of three int64 words: a flag word and the (numel, k) the sender used. Everything
travels in one byte tensor of a size every rank knows, by an equal-size allgather (shared
indices by a broadcast), so no count is read on the host and NCCL can carry it.

A receiver never branches on the flags on the host. :func:`gather_fixed` hands back
``bad``, a boolean tensor on the device (any rank non-finite, failed, or sending for another
(numel, k)); :meth:`Gathered.write` writes NaN everywhere when it is set, by a fill from a
device scalar; :class:`FlagCopy` brings the flags to the host by a copy that is read only
once it has completed.

Sums are formed in rank order from the gathered messages, so every rank gets the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from gradsparse.buffers import reusable

from .backend import Backend
from .wire import PeerError

__all__ = [
    "FAILED", "FATAL", "MISMATCHED", "NONFINITE", "FlagCopy", "Gathered", "broadcast_indices", "check_words",
    "gather_fixed", "gather_signs",
]  # fmt: skip

#: bits of the flag word; MISMATCHED is set by the receiver
NONFINITE, FAILED, MISMATCHED = 1, 2, 4
_HEADER_BYTES = 24  # flags, numel, k


def _aligned(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


@dataclass
class Gathered:
    """Every rank's message of one bucket, as views of the gathered bytes."""

    bad: torch.Tensor  # 0-dim bool on the device: some rank's flag word is not zero
    flags: torch.Tensor  # (P,) int64 flag words, MISMATCHED added by this receiver
    values: List[torch.Tensor]  # per rank, k values
    indices: List[torch.Tensor]  # per rank, k indices (empty when the indices are shared)

    def write(self, out: torch.Tensor, scale: float, shared: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scale`` times the sum into the flat ``out`` (zero elsewhere), in rank order;
        NaN everywhere when :attr:`bad`. ``shared``: the indices every rank sent at."""
        poison = torch.where(self.bad, float("nan"), 0.0).to(out.dtype)
        out.copy_(poison.expand(out.shape))
        if shared is None:
            for idx, vals in zip(self.indices, self.values):
                out.index_add_(0, idx, vals, alpha=scale)
        elif self.values:
            total = self.values[0].clone()
            for vals in self.values[1:]:
                total.add_(vals)
            out.index_add_(0, shared, total, alpha=scale)
        return out


def _header_constants(context: Dict[str, Any], numel: int, k: int, device: torch.device) -> torch.Tensor:
    """The (numel, k) header words, made once per bucket layout: no host-to-device copy per step."""
    key = f"fixed_header:{numel}:{k}:{device}"
    if key not in context:
        context[key] = torch.tensor([numel, k], dtype=torch.int64, device=device)
    words: torch.Tensor = context[key]
    return words


def broadcast_indices(backend: Backend, indices: torch.Tensor, leader: int) -> None:
    """The leader's k indices into ``indices`` on every rank (a fixed-size broadcast)."""
    if indices.numel():
        backend.broadcast(indices, leader).wait()


def _gather_parts(
    backend: Backend,
    parts: List[torch.Tensor],
    flag: torch.Tensor,
    words: Tuple[int, int],
    context: Dict[str, Any],
) -> torch.futures.Future[Tuple[torch.Tensor, List[List[torch.Tensor]]]]:
    """Allgather ``[flag | words | parts...]`` (each part 8-byte aligned) from every rank:
    a future of (the flag words with MISMATCHED set where a rank's ``words`` differ, each
    rank's parts as views of the gathered bytes, with this rank's dtypes and sizes)."""
    device = flag.device
    sizes = [part.numel() * part.element_size() for part in parts]
    size = _HEADER_BYTES + sum(_aligned(n) for n in sizes)
    like = parts[0] if parts else flag
    message = reusable(context, "fixed_message", size, like, torch.uint8)
    header = message[:_HEADER_BYTES].view(torch.int64)
    header[0:1].copy_(flag.view(1))
    header[1:].copy_(_header_constants(context, *words, device))
    starts, at = [], _HEADER_BYTES
    for part, n in zip(parts, sizes):
        message[at : at + n].view(part.dtype).copy_(part.reshape(-1))
        starts.append(at)
        at += _aligned(n)
    world = backend.size

    def unpack(fut: torch.futures.Future[torch.Tensor]) -> Tuple[torch.Tensor, List[List[torch.Tensor]]]:
        rows = fut.value().view(world, size)
        got = rows[:, :_HEADER_BYTES].view(torch.int64)
        mismatch = (got[:, 1:] != _header_constants(context, *words, device)).any(dim=1)
        flags = got[:, 0] | (mismatch.to(torch.int64) * MISMATCHED)
        views = [
            [rows[r, a : a + n].view(part.dtype) for part, a, n in zip(parts, starts, sizes)] for r in range(world)
        ]
        return flags, views

    return backend.allgather(message).then(unpack)


#: dtype codes in the header's second word (15: another dtype)
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4, torch.int32: 5, torch.int64: 6}


def _kind_word(values: torch.Tensor, indices: Optional[torch.Tensor]) -> int:
    """The header's second word: k and the dtypes, so that a peer sending another count or
    dtype (of the same byte size) is flagged MISMATCHED."""
    icode = 0 if indices is None else _DTYPE_CODES.get(indices.dtype, 15)
    return values.numel() * 256 + _DTYPE_CODES.get(values.dtype, 15) * 16 + icode


def gather_fixed(
    backend: Backend,
    values: torch.Tensor,
    indices: Optional[torch.Tensor],
    flag: torch.Tensor,
    numel: int,
    context: Dict[str, Any],
) -> torch.futures.Future[Gathered]:
    """Allgather every rank's k ``values`` and (``indices`` not None) k indices into a
    tensor of ``numel``, with the 0-dim int64 tensor ``flag`` (on the values' device) as the
    flag word. ``context`` keeps the message buffer and the header words from one step to
    the next."""
    parts = [values] if indices is None else [values, indices]

    def as_gathered(fut: torch.futures.Future[Tuple[torch.Tensor, List[List[torch.Tensor]]]]) -> Gathered:
        flags, views = fut.value()
        return Gathered(
            (flags != 0).any(), flags, [v[0] for v in views], [v[1] for v in views] if indices is not None else []
        )

    return _gather_parts(backend, parts, flag, (numel, _kind_word(values, indices)), context).then(as_gathered)


def gather_signs(
    backend: Backend,
    signs: torch.Tensor,
    scales: torch.Tensor,
    flag: torch.Tensor,
    numel: int,
    context: Dict[str, Any],
    *,
    block: int,
    bits: int = 1,
) -> torch.futures.Future[Gathered]:
    """Allgather every rank's packed ``signs`` (``bits`` per entry: the codes of
    :class:`gradsparse.compressors.ScaledSign` or ``BlockQuantizer``) and ``scales`` (one per
    ``block`` entries) of a tensor of ``numel``, with the flag word: a :class:`Gathered`
    whose ``values`` are the ranks' scales and ``indices`` their codes. A rank whose
    (numel, block, bits) differs is flagged MISMATCHED (the header's second word is
    ``block * 16 + bits``)."""

    def as_gathered(fut: torch.futures.Future[Tuple[torch.Tensor, List[List[torch.Tensor]]]]) -> Gathered:
        flags, views = fut.value()
        return Gathered((flags != 0).any(), flags, [v[1] for v in views], [v[0] for v in views])

    return _gather_parts(backend, [signs, scales], flag, (numel, block * 16 + bits), context).then(as_gathered)


#: flag bits that stop every rank, and what they say of the ranks that set them
FATAL = (
    (FAILED, "failed before sending their gradient payload; this rank stops too (see the failing rank's log)"),
    (MISMATCHED, "sent a message for another bucket layout (another tensor size, count or dtype: the ranks' models "
     "or bucket orders differ)"),
)  # fmt: skip


def check_words(words: List[int], when: str = "") -> None:
    """Raise :class:`PeerError` on every rank when some rank's flag word (of a fixed-size
    message) says it failed or sent for another tensor; ``when`` is added to the message."""
    for bit, what in FATAL:
        ranks = [r for r, w in enumerate(words) if w & bit]
        if ranks:
            raise PeerError(f"rank(s) {ranks} {what}{when}")


class FlagCopy:
    """Every rank's flag words on their way to the host: a copy that is read only once it
    has completed (a CUDA event's ``query()``), so reading never waits for the device."""

    def __init__(self, flags: torch.Tensor, step: int) -> None:
        self.step = step
        self.event: Optional[torch.cuda.Event] = None
        if flags.is_cuda:
            self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flags.clone()

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def read(self) -> List[int]:
        """The words (call once :meth:`ready`); numpy reads the host memory directly."""
        return [int(w) for w in self.host.numpy()]
