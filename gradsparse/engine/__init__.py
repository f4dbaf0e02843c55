"""The engine that the DDP hook and the Horovod optimizer share: one flat gradient through
a route's stages, with the state keyed by parameter name.

One concern per module:

=====================  ==========================================================
``options``            :class:`HookOptions`, the validated options (keyword-only)
``plan``               parameter names, bucket plans, gather/scatter, the weight-mask cache
``policy``             :class:`Policy`: per bucket and step, which route, and why
``compressor_states``  compressor state keyed by parameter name (the select stage's state)
``routes``             one object per route (dense, sparse, shared top-k), each owning its stages
``stats``              :class:`HookStats`, cumulative counters
``state``              :class:`SparseHookState`: options + stores + pickling
``saving``             the state's checkpoint format
``reduce``             the orchestrator: plan, the route's stages, write back
=====================  ==========================================================

The DDP hook (:mod:`gradsparse.ddp`) and the Horovod optimizer
(:mod:`gradsparse.integrations.horovod`) call :func:`~gradsparse.engine.reduce.reduce_gradients`.
"""

from __future__ import annotations

from .options import HookOptions
from .policy import Decision, Policy
from .reduce import end_step, reduce_gradients
from .routes import BucketStep, Route, register_route
from .state import SparseHookState

__all__ = [
    "BucketStep",
    "Decision",
    "HookOptions",
    "Policy",
    "Route",
    "SparseHookState",
    "end_step",
    "reduce_gradients",
    "register_route",
]
