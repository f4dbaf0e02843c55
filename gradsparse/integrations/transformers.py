"""gradsparse for the Hugging Face Trainer (``pip install 'gradsparse[transformers]'``).

The Trainer has no comm-hook argument; one line registers the hook on its DDP model when
training begins and adds the statistics to its logs (every ``report_to`` integration sees
them, and ``trainer.state.log_history`` keeps them)::

    from gradsparse.integrations.transformers import sparse_gradients
    trainer = Trainer(model=model, args=args, train_dataset=data)
    sparse_gradients(trainer, "topk", density=0.01)
    trainer.train()

For AdamW (the Trainer's default), let it build :class:`gradsparse.optim.SparseAdamW` from
its arguments instead, with gradient clipping off (``max_grad_norm=0``; it would clip
Adam's update direction)::

    sparse_gradients(trainer, "sign", min_compress_numel=0, sparse_adamw=True)
"""

from __future__ import annotations

from typing import Any, Union

from gradsparse.compressors import Compressor
from gradsparse.optim import SparseAdamW

from ._registration import HookOnModel, missing, refuse_clipping

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing("transformers", "transformers") from exc

__all__ = ["SparseGradientsCallback", "sparse_gradients"]


class SparseGradientsCallback(HookOnModel, TrainerCallback):
    """Registers the hook on ``trainer.model_wrapped`` at the start of training and adds
    the statistics to every log. Use :func:`sparse_gradients`, which also places it first,
    so that the reporting callbacks see the statistics."""

    def __init__(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.register(self.trainer.model_wrapped, "the Trainer's model")
        optimizer = kwargs.get("optimizer") or getattr(self.trainer, "optimizer", None)
        clip = args.max_grad_norm
        self.check_optimizers([optimizer] if optimizer is not None else [], f"max_grad_norm={clip}" if clip else None)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        metrics = self.metrics()
        if logs is not None:
            logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)


def sparse_gradients(
    trainer: Trainer, compressor: Union[str, Compressor] = "topk", *, sparse_adamw: bool = False, **options: Any
) -> SparseGradientsCallback:
    """Make ``trainer`` sum sparse gradients: ``options`` are the compressor's parameters and
    the hook's (see :func:`gradsparse.register_sparse_hook`), or ``state=`` a ready state.

    With ``sparse_adamw``, the Trainer builds :class:`~gradsparse.optim.SparseAdamW` in place
    of its AdamW, from its arguments (``learning_rate``, ``adam_beta1``, ``adam_beta2``,
    ``adam_epsilon``, and ``weight_decay`` on the parameters it decays). A SparseAdamW passed
    in the Trainer's ``optimizers`` or ``optimizer_cls_and_kwargs`` works without it."""
    if sparse_adamw:
        if trainer.optimizer is not None or trainer.optimizer_cls_and_kwargs is not None:
            raise ValueError(
                "sparse_gradients(sparse_adamw=True) builds the Trainer's optimizer, but the Trainer was "
                "given one: pass sparse_adamw=False, or build gradsparse.optim.SparseAdamW yourself"
            )
        args = trainer.args
        refuse_clipping(f"max_grad_norm={args.max_grad_norm}" if args.max_grad_norm else None)
        kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        trainer.optimizer_cls_and_kwargs = (SparseAdamW, kwargs)
    callback = SparseGradientsCallback(trainer, compressor, **options)
    trainer.callback_handler.callbacks.insert(0, callback)  # before the reporting callbacks
    return callback
