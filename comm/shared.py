"""``shared_topk``: one rank chooses the indices, every rank sends its values there.

ScaleCom's cyclic local top-k (Chen et al., NeurIPS 2020). Each round one rank, the
leader (in turn: round r is led by rank r mod P), chooses the index set from its own
compensated gradient. It broadcasts them with a three-word header; every rank then sends
its values at those indices through the transport's native allreduce (NCCL's, gloo's
ring), two more words carrying the ranks' flags (non-finite, failed). Everything a rank
does not send stays in its error feedback.

Both messages have sizes every rank knows beforehand: the broadcast is ``capacity`` index
words (the caller's budget, ``k``) and the allreduce is the count the header announced.
No counts are exchanged. Per rank that is ``4(k + 3)`` bytes received in a binomial
broadcast plus ``2(P-1)/P * 4(k + 2)`` in the ring, against ``(P-1) * 8k`` for
``allgather``.

The sum is exact on the chosen indices and identical on every rank. A malformed header or
index list is the same bytes on every rank, so every rank refuses it alike; a rank that
disagrees with the leader about the tensor, or failed, says so in the allreduce's flag
word, and every rank raises after it.

The hook uses :meth:`SharedTopkCollective.share` and :meth:`SharedTopkCollective.reduce_at`
directly, with every rank's dense compensated gradient. :meth:`Collective.reduce` on
payloads also works (every rank validates the headers first): a rank's entries outside the
leader's indices are not sent, and ``Reduced.kept`` tells the caller which were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from gradsparse.buffers import reusable
from gradsparse.payload import SparsePayload, index_dtype_for

from .backend import Backend
from .collectives import Collective, Reduced, allreduce_ordered, registry
from .wire import FLAG_ERROR, Headers, Message, PayloadError, PeerError

__all__ = ["SharedIndices", "SharedTopkCollective"]

_HEADER = 3  # numel, count, flags (FLAG_ERROR: the leader failed)


@dataclass(frozen=True)
class SharedIndices:
    """One round's index set, identical on every rank after :meth:`SharedTopkCollective.share`.

    ``agreed`` is False on a rank whose tensor has another size than the leader's: it
    reports that in :meth:`SharedTopkCollective.reduce_at`, so every rank raises there."""

    indices: torch.Tensor  # ascending, unique, in [0, numel)
    numel: int
    leader: int
    agreed: bool = True

    @property
    def count(self) -> int:
        return int(self.indices.numel())


def _check_indices(indices: torch.Tensor, numel: int, leader: int) -> None:
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= numel:
        raise PayloadError(f"rank {leader} (this round's leader) sent indices in [{low}, {high}], outside [0, {numel})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise PayloadError(f"rank {leader} (this round's leader) sent indices that are not ascending and unique")


@registry.register("shared_topk")
class SharedTopkCollective(Collective):
    """One leader's indices per round, every rank's values there, summed by allreduce.

    Args:
        rank_order: sum the values in rank order (:func:`allreduce_ordered`, the same bits
            on every transport) instead of by the transport's own allreduce.
    """

    name = "shared_topk"
    exact = False  # on payloads: entries outside the leader's indices are not sent

    def __init__(self, rank_order: bool = False) -> None:
        self.rank_order = bool(rank_order)

    @staticmethod
    def leader(round_: int, world: int) -> int:
        """The rank that chooses the indices in round ``round_``."""
        return round_ % world

    def share(
        self,
        indices: Optional[torch.Tensor],
        numel: int,
        capacity: int,
        backend: Backend,
        *,
        leader: int,
        failed: bool = False,
        device: Optional[torch.device] = None,
        context: Optional[Dict[str, Any]] = None,
    ) -> SharedIndices:
        """Broadcast the leader's ascending ``indices`` (at most ``capacity``: the leader
        trims them first, or every rank raises) to every rank. Others
        pass ``indices=None`` and the ``device`` of their tensor. Every rank must call it
        with the same ``capacity``. ``context`` (a dict the caller keeps per tensor) holds
        the message buffer between rounds; the indices returned are a view of it."""
        if capacity < 0 or numel < 0:
            raise ValueError(f"share: capacity and numel must be >= 0, got {capacity} and {numel}")
        dtype = index_dtype_for(numel)
        device = indices.device if indices is not None else (device or torch.device("cpu"))
        like = torch.empty(0, device=device)
        buf = reusable(context if context is not None else {}, "shared_indices", _HEADER + capacity, like, dtype)
        too_many = indices is not None and indices.numel() > capacity
        if backend.rank == leader:
            failed = failed or indices is None or too_many
            count = 0 if failed or indices is None else int(indices.numel())
            if count:
                assert indices is not None
                buf[_HEADER : _HEADER + count] = indices[:count]
            buf[:_HEADER] = torch.tensor([numel, count, FLAG_ERROR if failed else 0], dtype=dtype)
        backend.broadcast(buf, leader).wait()
        sent_numel, count, flags = (int(v) for v in buf[:_HEADER].tolist())
        if flags & FLAG_ERROR:
            if too_many and backend.rank == leader:
                assert indices is not None
                raise PayloadError(f"share: the leader passed {indices.numel()} indices for a capacity of {capacity}")
            raise PeerError(
                f"rank {leader} (this round's leader) failed before sending its indices; this rank "
                f"({backend.rank}) stops too. See the failing rank's log for the cause."
            )
        if not 0 <= count <= capacity:
            raise PayloadError(f"rank {leader} (this round's leader) announced {count} indices for {capacity} slots")
        chosen = buf[_HEADER : _HEADER + count]
        _check_indices(chosen, sent_numel, leader)
        return SharedIndices(chosen, sent_numel, leader, agreed=sent_numel == numel)

    def reduce_at(
        self,
        shared: SharedIndices,
        values: torch.Tensor,
        backend: Backend,
        *,
        nonfinite: bool = False,
        failed: bool = False,
        context: Optional[Dict[str, Any]] = None,
    ) -> torch.futures.Future[Reduced]:
        """Sum every rank's ``values`` at ``shared.indices`` (``shared.count`` of them, zeros
        from a rank that failed). The result is NaN everywhere when any rank was non-finite.
        ``context`` holds the sum's buffer between rounds; the result is a view of it."""
        count, world = shared.count, backend.size
        if not failed and values.numel() != count:
            raise ValueError(f"reduce_at: values has {values.numel()} entries, the shared indices {count}")
        buf = reusable(context if context is not None else {}, "shared_values", count + 2, values)
        if failed:
            buf[:count] = 0
        else:
            buf[:count] = values
        buf[count] = float(nonfinite)
        buf[count + 1] = float(failed or not shared.agreed)
        native = None if self.rank_order else backend.allreduce_native(buf)
        fut = native if native is not None else allreduce_ordered(buf, backend)
        rank = backend.rank

        def _result(f: torch.futures.Future[torch.Tensor]) -> Reduced:
            total = f.value()
            bad, stopped = (float(v) for v in total[count:].tolist())
            if stopped:
                raise PeerError(
                    f"a rank failed or holds another tensor size than the leader's ({shared.numel}); "
                    f"this rank ({rank}) stops too. See the failing rank's log for the cause."
                )
            counts = (count,) * world
            if bad:
                return Reduced(shared.numel, nonfinite=True, counts=counts)
            summed = SparsePayload(shared.indices, total[:count], shared.numel)
            return Reduced(shared.numel, parts=[Message(0, sparse=summed)], counts=counts)

        return fut.then(_result)

    def combine(
        self, payload: SparsePayload, backend: Backend, headers: Headers, context: Dict[str, Any]
    ) -> torch.futures.Future[Reduced]:
        """On payloads (after the header exchange validated them): every rank's values at
        this round's leader's indices. ``Reduced.kept`` marks this rank's entries that were
        sent; ``context`` counts the rounds of this tensor."""
        round_ = int(context.get("round", 0))
        context["round"] = round_ + 1
        leader = self.leader(round_, backend.size)
        mine = payload.indices if backend.rank == leader else None
        device = payload.values.device
        shared = self.share(mine, headers.numel, headers.counts[leader], backend, leader=leader, device=device)
        # no buffers kept in ``context`` here: the payload's rounds are short and rare
        values = torch.zeros(shared.count, dtype=payload.values.dtype, device=payload.values.device)
        kept = torch.zeros(payload.count, dtype=torch.bool, device=payload.values.device)
        if shared.count and payload.count:
            at = torch.searchsorted(payload.indices, shared.indices).clamp_(max=payload.count - 1)
            hit = payload.indices[at] == shared.indices
            values[hit] = payload.values[at[hit]]
            kept[at[hit]] = True
        return self.reduce_at(shared, values, backend).then(lambda f: _with_kept(f.value(), kept))


def _with_kept(reduced: Reduced, kept: torch.Tensor) -> Reduced:
    reduced.kept = kept
    return reduced
