"""The one place that decides, per bucket and step, how a bucket travels: which route
(:mod:`gradsparse.engine.routes`), at which density, over which coordinates. It applies the
dense steps (``start_step``), the density ramp, the dense steps of RigL mask regrowth,
values only under weight masks, and whether the collective's cost model prefers dense.

Every input to a decision is the same on every rank (the step, the plan, the masks, the
counts every rank announced last time), so every rank decides the same."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from gradsparse.comm import AllgatherCollective, Backend, Collective, SparseCost
from gradsparse.compressors import Compressor, NoCompression, ScaledSign, k_for_density
from gradsparse.masking import WeightMasker

from . import routes
from .options import HookOptions
from .plan import BucketPlan
from .routes import Route
from .routes import device as device_route

__all__ = ["HOOK_PASSES", "Decision", "Policy"]

#: Read+write passes over a bucket that the sparse route costs the hook besides selection:
#: the finiteness check, compensation, the error-feedback commit and the decode (measured:
#: about 12 on the development machine).
HOOK_PASSES = 12.0


@dataclass(frozen=True)
class Decision:
    """How one bucket travels this step."""

    route: Route
    compressor: Compressor
    masked: bool  # select (or send) among the active coordinates of the weight masks
    work_numel: int  # entries selected over: the region, or its active coordinates
    reason: str
    #: k = density x work_numel for a compressor with a density budget at this step's
    #: (ramped) density, else None: what ``shared_topk``'s leader may send
    budget: Optional[int] = None


def _check_own_route(
    compressor: Compressor, options: HookOptions, collective: Collective, route: Optional[str]
) -> None:
    """A compressor that brings its own route (``sign``) gathers its messages itself, and
    every coordinate is sent every step."""
    if route is not None and route != compressor.route:
        raise ValueError(
            f"Argument `route` must be {compressor.route!r} (or unset) for the {compressor.name!r} compressor, "
            f"but got {route!r}."
        )
    if type(collective) is not AllgatherCollective:
        raise ValueError(
            f"Argument `collective` must be 'allgather' for the {compressor.name!r} compressor (its route gathers "
            f"packed messages of one size), but got {type(collective).__name__}."
        )
    if options.momentum:
        raise ValueError(
            f"Argument `momentum` must be 0 with the {compressor.name!r} compressor, but got {options.momentum}: "
            "DGC's momentum correction clears what was sent, and it sends every coordinate. Keep the optimizer's "
            "momentum (SGD's, or SparseAdamW's first moment)."
        )


class Policy:
    """Decides each bucket's route; remembers the counts ranks sent, per bucket.

    ``route`` names the route of the sparse steps (default: the one that serves the
    collective, see :func:`gradsparse.engine.routes.for_collective`); the dense steps take the
    ``dense`` route."""

    device: Optional[Route] = None  # for policies pickled before the device route existed
    _signs: Optional[Tuple[Route, Compressor]] = None  # the sign warm-up's, built when first taken

    def __init__(
        self,
        compressor: Compressor,
        options: HookOptions,
        collective: Collective,
        masker: Optional[WeightMasker],
        route: Optional[str] = None,
    ) -> None:
        self.compressor = compressor
        self.options = options
        self.collective = collective
        self.masker = masker
        self.dense: Route = routes.build("dense")
        if compressor.route is not None:
            _check_own_route(compressor, options, collective, route)
        chosen = route if route is not None else compressor.route or routes.for_collective(collective)
        self.route: Route = routes.build(chosen)
        self.route.check(compressor)
        #: the sync-free device route, when it may be taken (see ``HookOptions.sync_free``)
        self.device: Optional[Route] = None
        if options.sync_free is not False and route is None and device_route.supports(compressor, collective):
            self.device = routes.build("device")
        elif options.sync_free and not self.route.sync_free:
            raise ValueError(
                "Argument `sync_free=True` needs a fixed-budget compressor "
                f"({', '.join(device_route.FIXED_BUDGET)}) and the collective "
                f"{' or '.join(repr(c) for c in device_route.COLLECTIVES)}, and no `route`; got compressor "
                f"{compressor.name!r}, collective {type(collective).__name__}, route {route!r}."
            )
        self._ramped: Dict[float, Compressor] = {}
        self._mean_counts: Dict[str, float] = {}

    def compressor_at(self, step: int) -> Compressor:
        """The compressor with the density of the ramp at ``step`` (the ramp begins after
        the dense steps and the sign warm-up)."""
        options = self.options
        ramp, into = options.density_warmup_steps, max(0, step - options.start_step - options.sign_warmup_steps)
        if not ramp or into >= ramp:
            return self.compressor
        target = float(getattr(self.compressor, "density"))  # noqa: B009 - density-based (checked)
        start = max(self.options.warmup_initial_density, target)
        density = float(f"{start * (target / start) ** (into / ramp):.6g}")
        if density not in self._ramped:
            self._ramped[density] = dataclasses.replace(self.compressor, density=density)  # type: ignore[call-arg]
        return self._ramped[density]

    def decide(self, step: int, plan: BucketPlan, backend: Backend, like: torch.Tensor) -> Decision:
        compressor = self.compressor_at(step)
        numel = plan.numel
        dense_if_any = self.dense if numel else self.route
        if step < self.options.start_step:
            return Decision(dense_if_any, compressor, False, numel, "dense steps")
        masker = self.masker
        if masker is not None and masker.needs_dense_gradients():
            return Decision(dense_if_any, compressor, False, numel, "mask regrowth")
        active = plan.masks.refresh(masker, plan.layout, like) if masker is not None else None
        masked = active is not None
        work = numel if active is None else active.numel()
        if masked and isinstance(compressor, NoCompression):
            return Decision(self.dense if work else self.route, compressor, True, work, "active values")
        if work and step < self.options.start_step + self.options.sign_warmup_steps:
            route, signs = self._sign_warm_up()
            return Decision(route, signs, masked, work, "sign warm-up")
        budget = k_for_density(getattr(compressor, "density"), work) if compressor.density_based else None  # noqa: B009
        if work and self._link_prefers_dense(compressor, plan.key, work, budget, like.element_size(), backend):
            return Decision(self.dense, compressor, masked, work, "cost model", budget)
        chosen = self.route
        if self.device is not None and (self.options.sync_free or like.is_cuda):
            chosen = self.device
        return Decision(chosen, compressor, masked, work, chosen.name, budget)

    def _sign_warm_up(self) -> Tuple[Route, Compressor]:
        """The route and compressor of the sign warm-up (``HookOptions.sign_warmup_steps``)."""
        if self._signs is None:
            self._signs = (routes.build("sign"), ScaledSign())
        return self._signs

    def _link_prefers_dense(
        self, compressor: Compressor, key: str, numel: int, budget: Optional[int], itemsize: int, backend: Backend
    ) -> bool:
        expected = budget if budget is not None else self._mean_counts.get(key)
        if expected is None:
            return False
        route = SparseCost(numel, int(expected), itemsize, compressor.selection_passes + HOOK_PASSES)
        return self.collective.prefers_dense(backend, route)

    def learn(self, key: str, counts: tuple) -> None:
        """Remember what every rank sent for this bucket (shared numbers: the headers')."""
        if counts:
            self._mean_counts[key] = sum(counts) / len(counts)
