"""The Lightning callback's behaviour, for both ``lightning.pytorch`` and
``pytorch_lightning`` (their ``Callback`` base classes differ, so each module defines its
class from this one)."""

from __future__ import annotations

from typing import Any, Optional

from ._registration import HookOnModel

__all__ = ["LightningHook"]


class LightningHook(HookOnModel):
    """Registers the hook on the strategy's DDP model at fit start, on CPU and GPU alike
    (``DDPStrategy(ddp_comm_hook=...)`` registers only on CUDA), under the subprocess and
    the spawn launchers; logs the statistics every ``log_every_n_steps`` (default: the
    Trainer's) through ``pl_module.log``, from rank 0. A
    :class:`~gradsparse.optim.SparseAdamW` that ``configure_optimizers`` built without
    ``hook=`` gets the hook's state at fit start."""

    def __init__(self, *args: Any, log_every_n_steps: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_every_n_steps = log_every_n_steps

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.register(trainer.strategy.model, f"the {type(trainer.strategy).__name__}'s model")
        clip = getattr(trainer, "gradient_clip_val", None)
        self.check_optimizers(getattr(trainer, "optimizers", []), f"gradient_clip_val={clip}" if clip else None)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            for name, value in self.metrics().items():
                pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)
