"""``auto``: choose the collective per bucket and step from an alpha-beta cost model.

The model has three numbers: ``latency_s`` (alpha, per message), ``bandwidth_Bps``
(1/beta, bytes per second on one link) and ``memory_Bps`` (bytes per second of one
read+write pass over memory, which prices selection). They are given by the user or
measured once by :func:`measure_link`, a short probe on the group whose results are
agreed on by every rank (worst latency, lowest bandwidths), so every rank's model, and
therefore every rank's choice, is the same.

The hook asks :meth:`AutoCollective.prefers_dense` before selecting anything: when a
dense allreduce of the whole tensor is predicted to be no slower than selection plus the
cheapest sparse collective (fast links, high density, many ranks), the bucket goes dense
and nothing is kept back. Otherwise, once the headers tell every rank's actual count,
the cheapest exact algorithm is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from gradsparse._timing import median_seconds
from gradsparse._validate import check_nonnegative
from gradsparse.payload import SparsePayload

from .backend import Backend
from .collectives import Collective, Reduced, _bounds, registry
from .sparcml import _range_counts
from .wire import Headers, choose_encoding, encoded_bytes, exchange_headers

__all__ = ["AutoCollective", "LinkModel", "measure_link", "predict"]

_CANDIDATES = ("allgather", "split_allgather", "recursive_doubling", "dense")


@dataclass(frozen=True)
class LinkModel:
    latency_s: float
    bandwidth_Bps: float
    memory_Bps: float

    def wire(self, messages: float, nbytes: float) -> float:
        return messages * self.latency_s + nbytes / self.bandwidth_Bps

    def memory(self, nbytes: float) -> float:
        return nbytes / self.memory_Bps


def measure_link(backend: Backend, *, probe_bytes: int = 1 << 22, repeats: int = 5) -> LinkModel:
    """Measure latency and bandwidth with a short allgather probe, and memory bandwidth
    with one read+write pass over 64 MB (all ranks at once, so shared cores show); every
    rank adopts the most pessimistic figures."""
    p = backend.size
    x = torch.randn(1 << 24)  # 64 MB: far beyond the caches, or the memory looks free
    buf = torch.empty_like(x)
    torch.abs(x, out=buf)
    memory = 2 * x.nbytes / median_seconds(lambda: torch.abs(x, out=buf), repeats)
    if p == 1:
        return LinkModel(0.0, math.inf, memory)
    tiny = torch.zeros(1, dtype=torch.int64)
    big = torch.zeros(probe_bytes, dtype=torch.uint8)
    for _ in range(2):
        backend._allgather_fixed(tiny).wait()
        backend._allgather_fixed(big).wait()
    latency = median_seconds(lambda: backend._allgather_fixed(tiny).wait(), 3 * repeats) / (p - 1)
    per_step = median_seconds(lambda: backend._allgather_fixed(big).wait(), repeats) / (p - 1)
    bandwidth = probe_bytes / max(per_step - latency, 1e-9)
    mine = torch.tensor([int(latency * 1e9), int(bandwidth), int(memory)], dtype=torch.int64)
    table = backend._allgather_fixed(mine).wait().view(p, 3)
    return LinkModel(
        latency_s=float(table[:, 0].max()) / 1e9,
        bandwidth_Bps=float(table[:, 1].min()),
        memory_Bps=float(table[:, 2].min()),
    )


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
#: Read+write passes the hook spends besides selection: finiteness, compensation, the
#: error-feedback commit, zeroing the output (measured: about 12 on the development machine).
HOOK_PASSES = 12


def _decode_seconds(model: LinkModel, count: int, span: int, itemsize: int) -> float:
    """Decoding and scatter-adding one message of ``count`` entries over ``span``."""
    return model.memory(_DECODE_BYTES_PER_ENTRY * count + 2 * span // 8)


def predict(model: LinkModel, name: str, counts: Sequence[int], numel: int, itemsize: int) -> float:
    """Predicted seconds of collective ``name`` for these per-rank counts: wire time plus
    the CPU work of encoding, decoding and merging."""
    p = len(counts)
    if p == 1:
        return 0.0
    if name == "dense":
        moved = 2 * (p - 1) * numel * itemsize / p
        return model.wire(2 * (p - 1), moved) + model.memory(2 * numel * itemsize)
    sizes = [_message_bytes(c, numel, itemsize) for c in counts]
    if name == "allgather":  # the busiest rank receives everyone else's message
        decode = sum(_decode_seconds(model, c, numel, itemsize) for c in counts)
        return model.wire(p - 1, sum(sizes) - min(sizes)) + decode
    if name == "split_allgather":
        span = -(-numel // p)
        scatter = max(_message_bytes(math.ceil(c * (p - 1) / p), numel, itemsize) for c in counts)
        union = min(span, math.ceil(sum(counts) / p))
        reduced = _message_bytes(union, span, itemsize)
        work = model.memory(4 * span * itemsize) + sum(_decode_seconds(model, union, span, itemsize) for _ in range(p))
        return model.wire(2 * (p - 1) + 1, scatter + (p - 1) * reduced) + work
    if name == "recursive_doubling":
        p2 = 1 << (p.bit_length() - 1)
        rounds = int(math.log2(p2))
        total, count = 0.0, max(counts)
        if p != p2:
            total += 2 * model.wire(2, _message_bytes(count, numel, itemsize)) + _merge_seconds(model, 2 * count)
            count = min(numel, 2 * count)
        for _ in range(rounds):
            total += model.wire(2, _message_bytes(count, numel, itemsize)) + _merge_seconds(model, 2 * count)
            count = min(numel, 2 * count)
        return total
    raise ValueError(f"no cost model for collective {name!r}")


@registry.register("auto")
class AutoCollective(Collective):
    """Per bucket and step, the collective the alpha-beta model predicts to be fastest.

    Args:
        latency_s, bandwidth_Bps, memory_Bps: the model; any left out is measured once by
            a probe on the group the first time it is needed.
        candidates: the exact collectives to choose from.
    """

    name = "auto"

    def __init__(
        self,
        latency_s: Optional[float] = None,
        bandwidth_Bps: Optional[float] = None,
        memory_Bps: Optional[float] = None,
        candidates: Sequence[str] = _CANDIDATES,
    ) -> None:
        given = [v for v in (latency_s, bandwidth_Bps, memory_Bps) if v is not None]
        for arg, value in (
            ("latency_s", latency_s),
            ("bandwidth_Bps", bandwidth_Bps),
            ("memory_Bps", memory_Bps),
        ):
            if value is not None:
                check_nonnegative(arg, value, positive=arg != "latency_s")
        if given and len(given) != 3:
            raise ValueError("give all of `latency_s`, `bandwidth_Bps` and `memory_Bps`, or none (to measure them)")
        for name in candidates:
            if name not in _CANDIDATES:
                raise ValueError(f"Expected `candidates` among {list(_CANDIDATES)}, but got {name!r}.")
        self.model: Optional[LinkModel] = (
            LinkModel(float(latency_s), float(bandwidth_Bps), float(memory_Bps))  # type: ignore[arg-type]
            if given
            else None
        )
        self.candidates: Tuple[str, ...] = tuple(candidates)
        self._impl: Dict[str, Collective] = {n: registry.get(n)() for n in self.candidates}
        self.choices: Dict[str, int] = {}

    def link(self, backend: Backend) -> LinkModel:
        """The cost model, measured on first use (a collective call: every rank must
        reach it together, which the hook guarantees)."""
        if self.model is None:
            self.model = measure_link(backend)
        return self.model

    def prefers_dense(self, backend: Backend, numel: int, expected_count: int, itemsize: int, passes: float) -> bool:
        """Dense when a dense allreduce is predicted no slower than the hook's CPU work
        (selection's ``passes`` plus :data:`HOOK_PASSES`, each a read and a write of the
        tensor) plus the cheapest sparse collective."""
        model = self.link(backend)
        counts = [expected_count] * backend.size
        dense = predict(model, "dense", counts, numel, itemsize)
        cpu = model.memory(2 * (passes + HOOK_PASSES) * numel * itemsize)
        sparse = cpu + min(predict(model, n, counts, numel, itemsize) for n in self.candidates if n != "dense")
        return dense <= sparse

    def _exchange(self, payload: SparsePayload, backend: Backend, flags: int, context: Dict[str, Any]) -> Headers:
        self.link(backend)
        kind = choose_encoding(payload.count, payload.numel, payload.values.dtype, payload.indices.dtype)
        extra = _range_counts(payload, _bounds(payload.numel, backend.size))
        return exchange_headers(backend, payload, flags, kind=kind, extra=extra)

    def choose(self, headers: Headers) -> str:
        assert self.model is not None
        itemsize = headers.value_dtype.itemsize
        costs: List[Tuple[float, str]] = [
            (predict(self.model, n, headers.counts, headers.numel, itemsize), n) for n in self.candidates
        ]
        return min(costs)[1]

    def _reduce(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        name = self.choose(headers)
        self.choices[name] = self.choices.get(name, 0) + 1
        context["auto_choice"] = name
        return self._impl[name]._reduce(payload, backend, headers, context)

    def __repr__(self) -> str:
        return f"AutoCollective(model={self.model}, candidates={list(self.candidates)})"
