"""What every route shares: the typed hand-off between stages (:class:`BucketStep`), the
stage interface (:class:`Route`), and the registry of routes.

A route is how one bucket travels in one step. It owns its stages, called in this order
by the hook (``gradsparse.engine.reduce``), each a method of the route:

1. ``begin``: per-bucket bookkeeping before any work (shared top-k: this round's leader);
2. ``compensate``: scan the bucket, add the error-feedback residual, restrict to the
   weight masks' active coordinates;
3. ``select``: choose what is sent (sparse routes);
4. ``communicate``: start the sum across ranks, return its future;
5. ``commit``: once the sum has arrived and is known finite, keep in error feedback what
   was not sent; returns whether the sum is finite;
6. ``decode``: the averaged sum, over the values that were selected from.

The hook itself gathers the bucket, sends the small parameters, and writes the result
back: those are the same for every route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, List, Optional, Tuple, Type, TypeVar

import torch

from gradsparse.comm import Collective
from gradsparse.compressors import Compressor
from gradsparse.payload import Candidates, SparsePayload
from gradsparse.registry import Registry

from ..plan import BucketPlan

if TYPE_CHECKING:
    from ..policy import Decision
    from ..state import SparseHookState

__all__ = ["BucketStep", "Route", "available", "build", "for_collective", "register_route", "registry"]


@dataclass
class BucketStep:
    """One bucket's way through a route's stages: what each stage hands to the next."""

    plan: BucketPlan
    decision: Decision
    buffer: torch.Tensor  # the bucket: input gradients, output averages
    active: Optional[torch.Tensor]  # indices of the region's unmasked coordinates (None: all)
    payload: SparsePayload  # what this rank sends (sparse routes)
    started: float  # perf_counter() when the bucket arrived
    candidates: Optional[Candidates] = None  # entries of ``values`` above the compressor's floor
    scale: float = 1.0  # the AMP loss scale the gradients carry
    velocity: Optional[torch.Tensor] = None  # DGC momentum, from compensation, for the commit
    in_spare: bool = False  # ``values`` lies in error feedback's spare buffer (the fused pass)
    nonfinite: bool = False
    idle: Tuple[str, ...] = ()  # parameters that received no gradient: their state is kept
    failure: Optional[BaseException] = None  # raised by this rank's compensate or select
    leader: Optional[int] = None  # shared top-k: the rank that selects for this bucket
    #: device route: ``|values|`` and an int32 non-finite flag, from its fused pass
    magnitudes: Optional[torch.Tensor] = None
    flag: Optional[torch.Tensor] = None
    #: sign route: this rank's (packed signs, block scales), and their decoded values once
    #: the commit has made them (the sum reuses them for this rank's term)
    encoded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    decoded: Optional[torch.Tensor] = None
    #: sign route: per compressed parameter, whether it received no gradient (a device bool)
    held: Optional[torch.Tensor] = None
    sent_at: float = 0.0
    #: the region once gathered (see :attr:`region`), and what :attr:`values` was set to
    gathered: Optional[torch.Tensor] = None
    compensated: Optional[torch.Tensor] = None
    #: compensation read the gradients where they lie in the bucket, without gathering the
    #: region; the decode writes the averages there too (the sparse route, on CPU)
    in_bucket: bool = False
    #: compensation zeroed the compressed gradients in the bucket as it read them (their
    #: compensated values lie in the spare buffer), so the decode scatters without a fill
    cleared: bool = False

    @property
    def region(self) -> torch.Tensor:
        """The bucket's compressed parameters in canonical order (gradients in, averages
        out): a view of the bucket when they lie there contiguously, else gathered into a
        workspace on first use, which the hook scatters back after the decode."""
        if self.gathered is None:
            self.gathered = self.plan.gather(self.buffer)
        return self.gathered

    @property
    def values(self) -> torch.Tensor:
        """What is selected from and sent: the compensated region (by default the region
        itself, compensated in place), or its active coordinates' values."""
        return self.region if self.compensated is None else self.compensated

    @values.setter
    def values(self, values: torch.Tensor) -> None:
        self.compensated = values


class Route:
    """A route's stages. Subclasses override what differs; the defaults are the dense
    route's ``begin`` and ``select`` (nothing to do) and the plain, unfused compensation."""

    #: the name it is registered under
    name: ClassVar[str] = ""
    #: whether its sum carries NaN/inf through (dense) or every rank must check first (sparse)
    checks_finite: ClassVar[bool] = True
    #: whether a step on it reads no device value on the host (see ``HookOptions.sync_free``)
    sync_free: ClassVar[bool] = False

    @classmethod
    def serves(cls, collective: Collective) -> bool:
        """Whether this route is the one a collective needs for its sparse steps (the
        policy asks each registered route; ``sparse`` serves the others)."""
        return False

    def check(self, compressor: Compressor) -> None:
        """Refuse, at construction, a compressor this route cannot work with."""

    def begin(self, state: SparseHookState, step: BucketStep) -> None:
        """Per-bucket bookkeeping before any work; it must not fail on one rank only."""

    def compensate(self, state: SparseHookState, step: BucketStep) -> None:
        """Scan the bucket (its finiteness when :attr:`checks_finite`; the parameters
        without a gradient), show it to a compressor that keeps per-coordinate state, add
        the residual in place, and restrict to the active coordinates of the masks."""
        plan, layout = step.plan, step.plan.layout
        feedback, enabled = state.feedback, state.options.error_feedback
        if self.checks_finite or (enabled and not feedback.is_zero(layout)):
            finite, step.idle = plan.scan(step.buffer, check_finite=self.checks_finite)
            if not finite:
                step.nonfinite = True
                return
        if not step.region.numel():
            return
        state.selection.observe(state.compressor, plan.key, layout, step.region, state.step)
        step.scale = state.grad_scale()
        if enabled:
            step.velocity = feedback.compensate(layout, step.region, step.scale, keep=step.idle)
        if step.active is not None:
            assert plan.masks.flat is not None
            step.region.mul_(plan.masks.flat)  # masked coordinates: no gradient, no residual
            step.values = step.region[step.active]

    def select(self, state: SparseHookState, step: BucketStep) -> None:
        """Choose what is sent into ``step.payload`` (nothing to choose by default)."""

    def communicate(self, state: SparseHookState, step: BucketStep) -> torch.futures.Future[Any]:
        """Start the sum of this bucket's values across ranks."""
        raise NotImplementedError

    def commit(self, state: SparseHookState, step: BucketStep, summed: Any) -> bool:
        """Keep what was not sent, once the sum is known finite; return whether it is."""
        raise NotImplementedError

    def decode(self, state: SparseHookState, step: BucketStep, summed: Any) -> Optional[torch.Tensor]:
        """The averaged sum, laid out as ``step.values``. Decoding into ``step.region``
        itself (when there are no masks) saves the hook a copy; None when it was written
        into the bucket's compressed parameters directly (``step.in_bucket``)."""
        raise NotImplementedError


registry: Registry[Type[Route]] = Registry("route")

R = TypeVar("R", bound=Type[Route])


def register_route(name: str) -> Callable[[R], R]:
    """Class decorator: register a :class:`Route` under ``name`` (also its ``name``)."""

    def decorator(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Route)):
            raise TypeError(f"register_route({name!r}) decorates a gradsparse Route subclass, got {cls!r}")
        cls.name = name
        registry.register(name)(cls)
        return cls

    return decorator


def available() -> List[str]:
    """The names of the registered routes."""
    return registry.names()


def build(name: str) -> Route:
    """A new route by its registered name (an unknown one fails with the list)."""
    return registry.get(name)()


def for_collective(collective: Collective) -> str:
    """The registered route that serves ``collective``'s sparse steps (``sparse`` when no
    route claims it)."""
    claimed = [name for name in registry.names() if registry.get(name).serves(collective)]
    if len(claimed) > 1:
        raise ValueError(f"routes {claimed} all claim collective {type(collective).__name__}; pass `route=`")
    return claimed[0] if claimed else "sparse"


def is_finite(tensor: torch.Tensor) -> bool:
    """One read pass and no temporary: NaN propagates to both the minimum and the maximum,
    and +-inf shows up as one of them."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))
