"""What communication costs: the byte formulas and the alpha-beta(-memory) model.

The model has three numbers: ``latency_s`` (alpha, per message), ``bandwidth_Bps``
(1/beta, bytes per second on one link) and ``memory_Bps`` (bytes per second of one
read+write pass over memory, which prices the CPU work around a collective). They are
given by the user or measured once by :func:`measure_link`, a short probe on the group
whose results every rank agrees on (worst latency, lowest bandwidths), so every rank's
model, and therefore every rank's choice, is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from gradsparse.checks import check_int, check_nonnegative
from gradsparse.timing import median_seconds

from .backend import Backend, ring_allreduce_bytes
from .wire import choose_encoding, encoded_bytes

__all__ = ["PREDICTABLE", "LinkModel", "SparseCost", "measure_link", "predict"]


@dataclass(frozen=True)
class SparseCost:
    """What the sparse route of one tensor would cost its caller, for
    :meth:`Collective.prefers_dense`: the tensor's ``numel`` and ``itemsize``, the count
    every rank expects to send, and ``local_passes``, the read+write passes over the
    tensor that the caller spends only when it goes sparse (selection, error feedback)."""

    numel: int
    expected_count: int
    itemsize: int
    local_passes: float


@dataclass(frozen=True)
class LinkModel:
    latency_s: float
    bandwidth_Bps: float
    memory_Bps: float

    def wire(self, messages: float, nbytes: float) -> float:
        return messages * self.latency_s + nbytes / self.bandwidth_Bps

    def memory(self, nbytes: float) -> float:
        return nbytes / self.memory_Bps


def measure_link(
    backend: Backend, *, probe_bytes: int = 1 << 22, repeats: int = 5, probe_seconds: float = 0.01
) -> LinkModel:
    """Measure latency and bandwidth with a short allgather probe, and memory bandwidth
    with one read+write pass over 64 MB (all ranks at once, so shared cores show); every
    rank adopts the most pessimistic figures. The probe's bytes are accounted.

    The bandwidth probe starts at 64 KiB and grows until one allgather spends at least
    ``probe_seconds`` per peer beyond the latency, or reaches ``probe_bytes``: long enough
    that latency does not blur the bandwidth, short on a slow link (a fixed 4 MiB probe
    took 7 s over 130 Mbit/s on 4 ranks). Every rank takes each size decision from the
    slowest rank's timings, so all send the same sizes."""
    check_int("probe_bytes", probe_bytes, minimum=1)
    check_int("repeats", repeats, minimum=1)
    check_nonnegative("probe_seconds", probe_seconds)
    p = backend.size
    x = torch.randn(1 << 24)  # 64 MB: far beyond the caches, or the memory looks free
    buf = torch.empty_like(x)
    torch.abs(x, out=buf)
    pass_s = median_seconds(lambda: torch.abs(x, out=buf), repeats)
    if p == 1:
        return LinkModel(0.0, math.inf, 2 * x.nbytes / pass_s)
    memory = 2 * x.nbytes / _slowest(backend, pass_s)
    tiny = torch.zeros(1, dtype=torch.int64)
    for _ in range(2):
        backend.allgather(tiny).wait()
    latency = _slowest(backend, _allgather_seconds(backend, tiny, 3 * repeats))
    size = min(_FIRST_PROBE_BYTES, probe_bytes)
    while True:
        per_step = _slowest(backend, _allgather_seconds(backend, torch.zeros(size, dtype=torch.uint8), repeats))
        moving = max(per_step - latency, 0.0)  # agreed figures: the same decision on every rank
        if moving >= probe_seconds or size >= probe_bytes:
            break
        grow = math.ceil(probe_seconds / max(moving, 1e-9))
        size = min(probe_bytes, size * min(max(grow, 2), 64))
    # every figure is the slowest rank's already, so every rank builds the same model
    return LinkModel(latency_s=latency, bandwidth_Bps=size / max(moving, 1e-9), memory_Bps=memory)


#: the bandwidth probe's first message size (:func:`measure_link`)
_FIRST_PROBE_BYTES = 1 << 16


def _allgather_seconds(backend: Backend, message: torch.Tensor, repeats: int) -> float:
    """The median seconds of an allgather of ``message``, per peer."""
    return median_seconds(lambda: backend.allgather(message).wait(), repeats) / (backend.size - 1)


def _slowest(backend: Backend, seconds: float) -> float:
    """The largest of every rank's ``seconds`` (a blocking control allgather)."""
    mine = torch.tensor([int(seconds * 1e9)], dtype=torch.int64)
    return float(backend.allgather_control(mine).max()) / 1e9


def _message_bytes(count: int, span: int, itemsize: int) -> int:
    """Bytes of the cheapest message for ``count`` fp entries of a span (int32 indices)."""
    vdt = {2: torch.float16, 4: torch.float32, 8: torch.float64}[itemsize]
    return encoded_bytes(choose_encoding(count, span, vdt, torch.int32), count, span, vdt, torch.int32)


def _merge_seconds(model: LinkModel, entries: int) -> float:
    """Merging two sorted sparse lists of ``entries`` in all (sort, deduplicate,
    segment-sum): about 6 * log2(entries) memory passes over 8-byte entries, as measured
    on the development machine."""
    if entries <= 1:
        return 0.0
    return model.memory(8 * entries * 6 * math.log2(entries))


#: Memory traffic per decoded entry: producing indices (flatnonzero), viewing values and the
#: scatter-add, measured as about 25 ns per entry on the development machine.
_DECODE_BYTES_PER_ENTRY = 800


def _decode_seconds(model: LinkModel, count: int, span: int) -> float:
    """Decoding and scatter-adding one message of ``count`` entries over ``span``."""
    return model.memory(_DECODE_BYTES_PER_ENTRY * count + 2 * span // 8)


def _split_allgather(model: LinkModel, counts: Sequence[int], numel: int, itemsize: int) -> float:
    p = len(counts)
    span = -(-numel // p)
    scatter = max(_message_bytes(math.ceil(c * (p - 1) / p), numel, itemsize) for c in counts)
    union = min(span, math.ceil(sum(counts) / p))
    reduced = _message_bytes(union, span, itemsize)
    work = model.memory(4 * span * itemsize) + p * _decode_seconds(model, union, span)
    return model.wire(2 * (p - 1) + 1, scatter + (p - 1) * reduced) + work


def _recursive_doubling(model: LinkModel, counts: Sequence[int], numel: int, itemsize: int) -> float:
    p = len(counts)
    p2 = 1 << (p.bit_length() - 1)
    total, count = 0.0, max(counts)
    if p != p2:  # the ranks past p2 fold in, and get the result back at the end
        total += 2 * model.wire(2, _message_bytes(count, numel, itemsize)) + _merge_seconds(model, 2 * count)
        count = min(numel, 2 * count)
    for _ in range(int(math.log2(p2))):
        total += model.wire(2, _message_bytes(count, numel, itemsize)) + _merge_seconds(model, 2 * count)
        count = min(numel, 2 * count)
    return total


def predict(model: LinkModel, name: str, counts: Sequence[int], numel: int, itemsize: int) -> float:
    """Predicted seconds of collective ``name`` for these per-rank counts: wire time plus
    the CPU work of encoding, decoding and merging."""
    p = len(counts)
    if p == 1:
        return 0.0
    if name == "dense":
        moved = ring_allreduce_bytes(numel, itemsize, p)
        return model.wire(2 * (p - 1), moved) + model.memory(2 * numel * itemsize)
    if name == "allgather":  # the busiest rank receives everyone else's message
        sizes = [_message_bytes(c, numel, itemsize) for c in counts]
        decode = sum(_decode_seconds(model, c, numel) for c in counts)
        return model.wire(p - 1, sum(sizes) - min(sizes)) + decode
    if name == "split_allgather":
        return _split_allgather(model, counts, numel, itemsize)
    if name == "recursive_doubling":
        return _recursive_doubling(model, counts, numel, itemsize)
    raise ValueError(f"no cost model for collective {name!r}; expected one of {list(PREDICTABLE)}")


#: the collectives :func:`predict` knows
PREDICTABLE = ("allgather", "split_allgather", "recursive_doubling", "dense")
