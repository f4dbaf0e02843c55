"""The sparse DDP communication hook, over the engine (:mod:`gradsparse.engine`).

============  ==================================================================
``hook``      :func:`sparse_allreduce_hook`: DDP's bucket, or compiled DDP's parameter
``register``  :func:`register_sparse_hook`: one line on a DDP model
``sparse_gradient``  ``nn.Embedding(sparse=True)`` gradients, through DDP's sparse path
============  ==================================================================

The hook's state and options are re-exported here, where users of the hook look for them;
routes and the policy are :mod:`gradsparse.engine`'s.
"""

from __future__ import annotations

from gradsparse.engine import HookOptions, SparseHookState

from .hook import sparse_allreduce_hook
from .register import register_sparse_hook

__all__ = ["HookOptions", "SparseHookState", "register_sparse_hook", "sparse_allreduce_hook"]
