"""gradsparse for ``lightning.pytorch`` (``pip install 'gradsparse[lightning]'``)::

from gradsparse.integrations.lightning import SparseGradients
trainer = L.Trainer(strategy="ddp", callbacks=[SparseGradients("topk", density=0.01)])
"""

from __future__ import annotations

from ._lightning import LightningHook
from ._registration import missing

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing("lightning", "lightning") from exc

__all__ = ["SparseGradients"]


class SparseGradients(LightningHook, Callback):
    """The sparse hook on the Trainer's DDP model, with its statistics in Lightning's logger.
    Arguments as :class:`gradsparse.integrations._lightning.LightningHook`."""
