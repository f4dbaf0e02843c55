"""One-line integrations with the frameworks users train in.

=====================  =================================================================
``lightning``          ``SparseGradients`` callback for ``lightning.pytorch``
``pytorch_lightning``  the same callback for the ``pytorch_lightning`` package
``transformers``       ``sparse_gradients(trainer, ...)`` for the Hugging Face Trainer
=====================  =================================================================

accelerate needs none: ``gs.register_sparse_hook(accelerator.prepare(model), ...)``.
Each module imports its framework only when it is imported itself; a missing framework is
an ImportError naming the extra that installs it.
"""

from __future__ import annotations

from typing import List

__all__: List[str] = []
