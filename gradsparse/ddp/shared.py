"""The shared-index route of the hook (collective ``shared_topk``): this round's leader
selects, every rank sends its compensated values at the leader's indices."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from gradsparse.buffers import reusable
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
    context: Dict[str, Any],
) -> Tuple[SparsePayload, torch.futures.Future[Reduced]]:
    """Share the leader's ``chosen`` indices (None on the other ranks), then start the sum
    of every rank's ``work`` at them. Returns what this rank sends (for error feedback:
    everything else stays) and the future of the sum. ``context`` is the bucket's: it keeps
    the message buffers from one step to the next (the results are views of them, read by
    this step's commit before the bucket's next step starts)."""
    indices = trim(chosen, capacity) if chosen is not None and not failed else None
    shared = collective.share(
        indices, work.numel(), capacity, backend, leader=leader, failed=failed, device=work.device, context=context
    )
    values = reusable(context, "shared_sent", shared.count, work)
    if failed:
        values.zero_()
    else:
        torch.index_select(work, 0, shared.indices, out=values)
    future = collective.reduce_at(shared, values, backend, nonfinite=nonfinite, failed=failed, context=context)
    return SparsePayload(shared.indices, values, work.numel()), future
