"""The sparse DDP communication hook: options, plans, policy, state and the hook's stages.

One concern per module:

=============  ==================================================================
``options``    :class:`HookOptions`, the validated options
``plan``       parameter names, bucket plans, gather/scatter, the weight-mask cache
``policy``     :class:`Policy`: per bucket and step, dense or sparse, and why
``selection``  compressor state keyed by parameter name (the select stage's state)
``routes``     one object per route (dense, sparse, shared top-k), each owning its stages
``stats``      :class:`HookStats`, cumulative counters
``state``      :class:`SparseHookState`: options + stores + state_dict and pickling
``hook``       the orchestrator: plan, route's stages, write back
``register``   :func:`register_sparse_hook`
=============  ==================================================================
"""

from __future__ import annotations

from .hook import sparse_allreduce_hook
from .options import HookOptions
from .policy import Decision, Policy
from .register import register_sparse_hook
from .routes import BucketStep, Route, register_route
from .state import SparseHookState

__all__ = [
    "BucketStep",
    "Decision",
    "HookOptions",
    "Policy",
    "Route",
    "SparseHookState",
    "register_route",
    "register_sparse_hook",
    "sparse_allreduce_hook",
]
