"""What the framework integrations share: registering the hook on a framework's DDP
model, and the statistics they log."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, Optional, Union

import torch

from gradsparse.compressors import Compressor, NoCompression
from gradsparse.ddp import SparseHookState, register_sparse_hook
from gradsparse.optim import SparseAdamW

__all__ = ["ADAPTIVE", "LOGGED", "HookOnModel", "missing", "refuse_clipping"]

logger = logging.getLogger(__name__)

#: optimizers with per-coordinate second moments, which sparse gradients with error
#: feedback distort (see gradsparse.precondition)
ADAPTIVE = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
    torch.optim.Adagrad, torch.optim.RMSprop,
)  # fmt: skip

#: the statistics the integrations log, as ``gradsparse/<name>``
LOGGED = ("bytes_sent", "dense_bytes", "compression_ratio", "density", "residual_norm", "nonfinite_buckets")


def missing(package: str, extra: str) -> ImportError:
    return ImportError(f"gradsparse.integrations needs {package}: pip install 'gradsparse[{extra}]'")


def refuse_clipping(clipping: Optional[str]) -> None:
    """Refuse a framework's gradient clipping (``"name=value"``; None when off) with
    :class:`~gradsparse.optim.SparseAdamW`, whose gradients are Adam-normalised by the hook."""
    if clipping:
        raise ValueError(
            f"gradsparse: {clipping} would clip SparseAdamW's update direction (the hook hands it "
            "Adam-normalised gradients), not the gradient: set it to 0 (Adam's normalisation "
            "bounds each coordinate's step)"
        )


class HookOnModel:
    """Registers the sparse hook on a DDP model once, and reports its statistics.

    Args:
        compressor: a compressor name or instance, with its parameters in ``options``.
        state: a ready :class:`SparseHookState` instead (built in a parent process, or
            restored from a checkpoint); then ``options`` must be empty.
        options: the compressor's parameters and :class:`SparseHookState` options.
    """

    def __init__(
        self, compressor: Union[str, Compressor] = "topk", *, state: Optional[SparseHookState] = None, **options: Any
    ) -> None:
        if state is not None and options:
            raise ValueError(f"pass either `state` or options {sorted(options)}, not both")
        self.compressor = compressor
        self.options = options
        self.state: Optional[SparseHookState] = state

    def register(self, model: Any, where: str) -> SparseHookState:
        """Register on ``model`` (``where`` names it for errors), which must be DDP."""
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(
                f"gradsparse needs a DistributedDataParallel model, but {where} is {type(model).__name__}: "
                "train with a DDP strategy on two or more processes"
            )
        if self.state is not None and self.state in [s for _, s in getattr(model, "_comm_hooks", [])]:
            return self.state  # registered already (a second fit on the same model)
        self.state = register_sparse_hook(model, self.compressor, state=self.state, **self.options)
        return self.state

    def check_optimizers(self, optimizers: Iterable[Any], clipping: Optional[str] = None) -> bool:
        """Attach the state to each :class:`~gradsparse.optim.SparseAdamW` among
        ``optimizers`` (built without ``hook=``), refuse gradient ``clipping`` (the
        framework's setting, as ``"name=value"``, None when off) with one, and warn (once, and
        return True) when another adaptive optimizer trains on sparse gradients: the model
        ends worse."""
        state = self.state
        if state is None:
            return False
        inner = [getattr(opt, "optimizer", opt) for opt in optimizers]  # accelerate's and Lightning's wrappers
        sparse_adamw = [opt for opt in inner if isinstance(opt, SparseAdamW)]
        if sparse_adamw:
            refuse_clipping(clipping)
        for opt in sparse_adamw:
            opt.attach(state)
        if state.preconditioner is not None or isinstance(state.compressor, NoCompression):
            return False
        for opt in inner:
            if isinstance(opt, ADAPTIVE):
                logger.warning(
                    "gradsparse: %s on sparse gradients ends worse than dense training: on the quality "
                    "benchmark's character GPT, +57%% validation loss with top-k at 1%% density. Use "
                    "gradsparse.optim.SparseAdamW (its moments are taken before compression, and with top-k "
                    "it warms the hook up in 1-bit signs first): with the 'sign' compressor it kept that model "
                    "at dense AdamW's loss (+0.3%%), with top-k 1%% at +0.6%% "
                    "(docs/optimizers.md); compare with a dense run on your model",
                    type(opt).__name__,
                )
                return True
        return False

    def metrics(self) -> Dict[str, float]:
        """This rank's cumulative statistics, finite numbers only, as ``gradsparse/<name>``."""
        if self.state is None:
            return {}
        stats = self.state.stats()
        return {f"gradsparse/{k}": float(stats[k]) for k in LOGGED if math.isfinite(float(stats[k]))}
