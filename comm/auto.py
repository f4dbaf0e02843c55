"""``auto``: choose the collective per tensor and step from the alpha-beta model of
:mod:`gradsparse.comm.cost`.

Before anything is selected, the caller asks :meth:`AutoCollective.prefers_dense` with a
typed :class:`~gradsparse.comm.cost.SparseCost` (what the sparse route costs it): when a
dense allreduce of the whole tensor is predicted to be no slower than that plus the
cheapest sparse collective (fast links, high density, many ranks), the tensor goes dense.
Otherwise, once the headers tell every rank's actual count, the cheapest exact algorithm
is chosen.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from gradsparse.checks import check_nonnegative
from gradsparse.payload import SparsePayload

from ._common import bounds, range_counts
from .backend import Backend
from .collectives import Collective, Reduced, registry
from .cost import PREDICTABLE, LinkModel, SparseCost, measure_link, predict
from .wire import Headers, choose_encoding, exchange_headers

__all__ = ["AutoCollective"]


@registry.register("auto")
class AutoCollective(Collective):
    """Per tensor and step, the collective the alpha-beta model predicts to be fastest.

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
        candidates: Sequence[str] = PREDICTABLE,
    ) -> None:
        values = {"latency_s": latency_s, "bandwidth_Bps": bandwidth_Bps, "memory_Bps": memory_Bps}
        for arg, value in values.items():
            if value is not None:
                check_nonnegative(arg, value, positive=arg != "latency_s")
        given = [v for v in values.values() if v is not None]
        if given and len(given) != 3:
            raise ValueError("give all of `latency_s`, `bandwidth_Bps` and `memory_Bps`, or none (to measure them)")
        for name in candidates:
            if name not in PREDICTABLE:
                raise ValueError(f"Expected `candidates` among {list(PREDICTABLE)}, but got {name!r}.")
        self.model: Optional[LinkModel] = LinkModel(*map(float, given)) if given else None
        self.candidates: Tuple[str, ...] = tuple(candidates)
        self._impl: Dict[str, Collective] = {n: registry.get(n)() for n in self.candidates}

    def link(self, backend: Backend) -> LinkModel:
        """The cost model, measured on first use (a collective call: every rank must
        reach it together, which the hook guarantees)."""
        if self.model is None:
            self.model = measure_link(backend)
        return self.model

    def prefers_dense(self, backend: Backend, cost: SparseCost) -> bool:
        """Dense when a dense allreduce is predicted no slower than the caller's local work
        on the sparse route (``cost.local_passes``, each a read and a write of the tensor)
        plus the cheapest sparse collective."""
        model = self.link(backend)
        counts = [cost.expected_count] * backend.size
        numel, itemsize = cost.numel, cost.itemsize
        dense = predict(model, "dense", counts, numel, itemsize)
        local = model.memory(2 * cost.local_passes * numel * itemsize)
        sparse = min(predict(model, n, counts, numel, itemsize) for n in self.candidates if n != "dense")
        return dense <= local + sparse

    def exchange(self, payload: SparsePayload, backend: Backend, context: Dict[str, Any], *, flags: int) -> Headers:
        self.link(backend)
        kind = choose_encoding(payload.count, payload.numel, payload.values.dtype, payload.indices.dtype)
        extra = range_counts(payload, bounds(payload.numel, backend.size))
        return exchange_headers(backend, payload, flags, kind=kind, extra=extra)

    def choose(self, headers: Headers) -> str:
        """The candidate predicted fastest for these headers (the same on every rank)."""
        model = self.model
        if model is None:
            raise RuntimeError("AutoCollective.choose() before the link model was measured")
        itemsize = headers.value_dtype.itemsize
        costs: List[Tuple[float, str]] = [
            (predict(model, n, headers.counts, headers.numel, itemsize), n) for n in self.candidates
        ]
        return min(costs)[1]

    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        return self._impl[self.choose(headers)].combine(payload, backend, headers, context)

    def __repr__(self) -> str:
        return f"AutoCollective(model={self.model}, candidates={list(self.candidates)})"
