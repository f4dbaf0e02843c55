"""The shared-index route (collective ``shared_topk``, ScaleCom's cyclic local top-k): each
bucket round one rank in turn, the leader, selects; every rank sends its compensated values
at the leader's indices through the transport's own allreduce; everything else stays in
error feedback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch

from gradsparse import compressors
from gradsparse.buffers import reusable
from gradsparse.comm import Backend, Collective, Reduced, SharedTopkCollective
from gradsparse.payload import SparsePayload

from .route import BucketStep, register_route
from .sparse import SparseRoute

if TYPE_CHECKING:
    from ..state import SparseHookState

__all__ = ["SharedTopkRoute", "reduce_shared", "trim"]


@register_route("shared_topk")
class SharedTopkRoute(SparseRoute):
    """The leader selects; every rank reduces at its indices."""

    def __init__(self) -> None:
        #: buckets reduced on this route: round r is led by rank r mod P. The same on
        #: every rank, since every rank reduces the same buckets.
        self.rounds = 0

    @classmethod
    def serves(cls, collective: Collective) -> bool:
        return isinstance(collective, SharedTopkCollective)

    def check(self, compressor: compressors.Compressor) -> None:
        if not compressor.density_based:
            budgeted = [n for n in compressors.available() if compressors.registry.get(n).density_based]
            raise ValueError(
                f"Expected argument `compressor` to have a density budget with collective 'shared_topk' "
                f"(the leader sends density * numel indices), but got {compressor.name!r}; use one of {budgeted}."
            )

    def begin(self, state: SparseHookState, step: BucketStep) -> None:
        step.leader = self.rounds % state.backend.size
        self.rounds += 1

    def selects(self, state: SparseHookState, step: BucketStep) -> bool:
        return step.leader == state.backend.rank

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        collective, backend = state.collective, state.backend
        if not isinstance(collective, SharedTopkCollective) or step.leader is None or step.decision.budget is None:
            raise RuntimeError("the shared_topk route needs the shared_topk collective and a density budget")
        mine = step.payload if step.leader == backend.rank else None
        step.payload, future = reduce_shared(
            collective, backend, step.values, mine, leader=step.leader, capacity=step.decision.budget,
            nonfinite=step.nonfinite, failed=step.failure is not None, context=step.plan.context,
        )  # fmt: skip
        return future


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
