"""Ok-Topk (Li and Hoefler, "Near-Optimal Sparse Allreduce for Distributed Deep
Learning", PPoPP'22).

1. Sparse reduce-scatter over P regions whose boundaries balance the selected entries:
   every rank sends each region's entries to its owner, which sums them in rank order.
   Boundaries start equal and are re-estimated every ``repartition_every`` calls from the
   indices the previous call selected (identical on every rank, so no extra traffic).
2. A global top-k over the reduced values: owners agree on one threshold from two small
   histogram rounds (float exponents, then 256 linear sub-bins of the chosen exponent),
   exchanged as integers, so every rank computes the same threshold to the bit. The count
   kept is at least k and exceeds it by at most one sub-bin's population.
3. Owners allgather only what they keep: O(k) values travel back instead of O(kP).

This is lossy: reduced entries under the threshold are not in the result. Nothing is
lost, though: ``Reduced.kept`` marks which of this rank's own payload entries made it
into the sum, and the hook puts the value of every other entry back into this rank's
residual. Summed over ranks, what goes back is exactly each dropped entry's total, so
with error feedback every gradient contribution is still applied eventually.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Dict, List, Optional

import torch

from gradsparse.checks import check_int
from gradsparse.payload import SparsePayload

from ._common import bounds, gather_ranges, range_counts, reduce_scatter_sparse
from .backend import Backend, completed_future
from .collectives import Collective, Reduced, registry
from .wire import Headers, Message, PayloadError, exchange_headers

__all__ = ["OkTopkCollective"]

_SUB_BINS = 256


def _boundaries(context: Dict[str, Any], numel: int, parts: int) -> List[int]:
    edges = context.get("oktopk_bounds")
    if not isinstance(edges, list) or len(edges) != parts + 1 or edges[-1] != numel:
        edges = bounds(numel, parts)
        context["oktopk_bounds"] = edges
    return edges


def _selected_indices(parts: List[Message]) -> torch.Tensor:
    pieces = []
    for part in parts:
        if part.sparse is not None:
            pieces.append(part.sparse.indices.long())
        elif part.dense is not None:
            pieces.append(torch.nonzero(part.dense).squeeze(1) + part.lo)
    return torch.sort(torch.cat(pieces)).values if pieces else torch.empty(0, dtype=torch.int64)


def _kept(parts: List[Message], indices: torch.Tensor) -> torch.Tensor:
    """Which of this rank's ``indices`` appear in the result."""
    kept = torch.zeros(indices.numel(), dtype=torch.bool, device=indices.device)
    if not indices.numel():
        return kept
    idx = indices.long()
    for part in parts:
        if part.sparse is not None and part.sparse.count:
            sel = part.sparse.indices.long()
            pos = torch.searchsorted(sel, idx).clamp_max(sel.numel() - 1)
            kept |= sel[pos] == idx
        elif part.dense is not None:
            inside = (idx >= part.lo) & (idx < part.lo + part.dense.numel())
            local = (idx[inside] - part.lo).long()
            kept[inside] = part.dense[local] != 0
    return kept


@registry.register("oktopk")
class OkTopkCollective(Collective):
    """Sparse reduce-scatter over balanced regions, then a global top-k.

    Args:
        repartition_every: re-estimate region boundaries every this many calls (Ok-Topk
            uses 64 iterations).
        k: global entries to keep (default: the mean of the ranks' payload counts).
    """

    name = "oktopk"
    exact = False

    def __init__(self, repartition_every: int = 64, k: Optional[int] = None) -> None:
        self.repartition_every = check_int("repartition_every", repartition_every, minimum=1)
        self.k = None if k is None else check_int("k", k, minimum=1)

    def exchange(self, payload: SparsePayload, backend: Backend, context: Dict[str, Any], *, flags: int) -> Headers:
        edges = _boundaries(context, payload.numel, backend.size)
        crc = zlib.crc32(repr(edges).encode())
        return exchange_headers(backend, payload, flags, extra=[*range_counts(payload, edges), crc])

    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        numel, p, me, counts = headers.numel, backend.size, backend.rank, tuple(headers.counts)
        if len({row[-1] for row in headers.extra}) != 1:
            raise PayloadError("oktopk region boundaries differ across ranks; every rank must use the same state")
        if sum(counts) == 0:
            return completed_future(Reduced(numel, kept=torch.zeros(0, dtype=torch.bool), counts=counts))
        edges = _boundaries(context, numel, p)
        acc = reduce_scatter_sparse(payload, backend, headers, edges, context)
        k = self.k if self.k is not None else max(1, round(sum(headers.counts) / p))
        threshold = self._global_threshold(acc, k, backend)
        if threshold > 0:
            acc.masked_fill_(acc.abs() < threshold, 0)
        spans = [(edges[r], edges[r + 1] - edges[r]) for r in range(p)]
        fut = gather_ranges(backend, acc, edges[me], spans, numel, headers.index_dtype)
        calls = int(context.get("oktopk_calls", 0)) + 1
        context["oktopk_calls"] = calls

        def _finish(f: torch.futures.Future[List[Message]]) -> Reduced:
            parts = f.value()
            if calls % self.repartition_every == 0:
                self._repartition(context, parts, numel, p)
            return Reduced(numel, parts=parts, kept=_kept(parts, payload.indices), counts=counts)

        return fut.then(_finish)

    @staticmethod
    def _repartition(context: Dict[str, Any], parts: List[Message], numel: int, p: int) -> None:
        """Boundaries at the P-quantiles of the indices just selected (the same on every
        rank), so each region holds about k/P of them next time."""
        selected = _selected_indices(parts)
        if selected.numel() < p:
            return
        cuts = [int(selected[(j * selected.numel()) // p]) for j in range(1, p)]
        edges = [0, *cuts, numel]
        if all(edges[j] <= edges[j + 1] for j in range(p)):
            context["oktopk_bounds"] = edges

    @staticmethod
    def _global_threshold(acc: torch.Tensor, k: int, backend: Backend) -> float:
        """The largest threshold keeping at least k reduced entries over all regions."""
        info = torch.finfo(acc.dtype)
        mantissa_bits = round(-math.log2(info.eps))
        exp_min = math.frexp(info.tiny)[1] - mantissa_bits - 1  # below the smallest subnormal
        exp_bins = math.frexp(info.max)[1] + 1 - exp_min
        mag = acc.abs().double()
        mag = mag[mag > 0]
        exponents = torch.frexp(mag).exponent.long()  # mag in [2**(e-1), 2**e)
        bins = (exponents - exp_min).clamp(0, exp_bins - 1)
        coarse = backend.allgather_control(torch.bincount(bins, minlength=exp_bins).to(acc.device)).sum(0)
        if int(coarse.sum()) <= k:
            return 0.0
        above = torch.flip(torch.cumsum(torch.flip(coarse, [0]), 0), [0])  # entries in bins >= b
        b = int(torch.nonzero(above >= k).max())
        base = 2.0 ** (b + exp_min - 1)
        in_bin = mag[bins == b]
        sub = ((in_bin / base - 1.0) * _SUB_BINS).floor().long().clamp(0, _SUB_BINS - 1)
        fine = backend.allgather_control(torch.bincount(sub, minlength=_SUB_BINS).to(acc.device)).sum(0)
        higher = int(above[b + 1]) if b + 1 < exp_bins else 0
        fine_above = torch.flip(torch.cumsum(torch.flip(fine, [0]), 0), [0]) + higher
        s = int(torch.nonzero(fine_above >= k).max())
        return base * (1.0 + s / _SUB_BINS)
