"""The sparse DDP communication hook: options, plans, policy, state and the hook's stages.

One concern per module:

=============  ==================================================================
``options``    :class:`HookOptions`, the validated options
``plan``       parameter names, bucket plans, gather/scatter, the weight-mask cache
``policy``     :class:`Policy`: per bucket and step, dense or sparse, and why
``selection``  compressor state keyed by parameter name (the select stage's state)
``stats``      :class:`HookStats`, cumulative counters
``state``      :class:`SparseHookState`: options + stores + state_dict and pickling
``hook``       prepare → select → communicate → commit → write
``register``   :func:`register_sparse_hook`
=============  ==================================================================
"""

from __future__ import annotations

from .hook import sparse_allreduce_hook
from .options import HookOptions
from .policy import Decision, Policy
from .register import register_sparse_hook
from .state import SparseHookState

__all__ = ["Decision", "HookOptions", "Policy", "SparseHookState", "register_sparse_hook", "sparse_allreduce_hook"]
