"""gradsparse: sparse-gradient communication for data-parallel PyTorch training.

>>> import gradsparse as gs
>>> state = gs.register_sparse_hook(ddp, compressor="topk", density=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import logging

from gradsparse import comm, compressors, optim
from gradsparse.ddp import SparseHookState, register_sparse_hook, sparse_allreduce_hook
from gradsparse.error_feedback import ErrorFeedback
from gradsparse.payload import SparsePayload
from gradsparse.reshard import reshard_states

__all__ = [
    "ErrorFeedback",
    "SparseHookState",
    "SparsePayload",
    "__version__",
    "comm",
    "compressors",
    "optim",
    "register_sparse_hook",
    "reshard_states",
    "sparse_allreduce_hook",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
