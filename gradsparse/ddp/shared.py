"""The shared-index route of the hook (collective ``shared_topk``): this round's leader
selects, every rank sends its compensated values at the leader's indices."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gradsparse.comm import Backend, Reduced, SharedTopkCollective
from gradsparse.payload import SparsePayload

__all__ = ["reduce_shared", "trim"]


def trim(chosen: SparsePayload, capacity: int) -> torch.Tensor:
    """The leader's indices, cut to the ``capacity`` largest magnitudes when its
    compressor chose more (``sampled_topk`` aims at k, it does not hit it exactly)."""
    if chosen.count <= capacity:
        return chosen.indices
    top = torch.topk(chosen.values.abs(), capacity, sorted=False).indices
    return chosen.indices[torch.sort(top).values]


def reduce_shared(
    collective: SharedTopkCollective,
    backend: Backend,
    work: torch.Tensor,
    chosen: Optional[SparsePayload],
    *,
    leader: int,
    capacity: int,
    nonfinite: bool,
    failed: bool,
) -> Tuple[SparsePayload, torch.futures.Future[Reduced]]:
    """Share the leader's ``chosen`` indices (None on the other ranks), then start the sum
    of every rank's ``work`` at them. Returns what this rank sends (for error feedback:
    everything else stays) and the future of the sum."""
    indices = trim(chosen, capacity) if chosen is not None and not failed else None
    shared = collective.share(
        indices, work.numel(), capacity, backend, leader=leader, failed=failed, device=work.device
    )
    if failed:
        values = torch.zeros(shared.count, dtype=work.dtype, device=work.device)
    else:
        values = work.index_select(0, shared.indices.long())
    future = collective.reduce_at(shared, values, backend, nonfinite=nonfinite, failed=failed)
    return SparsePayload(shared.indices, values, work.numel()), future
