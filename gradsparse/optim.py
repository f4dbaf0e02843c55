"""Optimizers for sparse gradients with error feedback.

:class:`SparseAdamW` is AdamW split in two around the communication: the division by the
second moment happens on each rank before compression (:mod:`gradsparse.precondition`,
installed into the hook's state), the rest here, on the averaged result::

    state = gradsparse.register_sparse_hook(ddp, "topk", density=0.01)
    opt = gradsparse.optim.SparseAdamW(ddp.parameters(), lr=1e-3, weight_decay=0.1, hook=state)

With every gradient sent (density 1) it is AdamW with each rank's second moment in place
of the global one. Why AdamW itself fails with sparse gradients is in
:mod:`gradsparse.precondition`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import torch

from gradsparse.checks import check_nonnegative, check_probability
from gradsparse.ddp import SparseHookState
from gradsparse.precondition import AdamPreconditioner

__all__ = ["SparseAdamW"]


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose second moment is applied by the sparse hook, before compression.

    Args:
        params: the parameters, or parameter groups, as for ``torch.optim.AdamW``.
        lr: the learning rate, as ``torch.optim.AdamW``'s.
        betas: Adam's decays; ``betas[1]`` goes to the hook's preconditioner.
        eps: added to the second moment's root, in the hook's preconditioner.
        weight_decay: decoupled weight decay, as ``torch.optim.AdamW``'s.
        hook: the :class:`~gradsparse.SparseHookState` registered on the DDP model whose
            parameters these are (or the Horovod optimizer's ``hook_state``).

    With the hook's DGC momentum correction (``momentum=m``), the first moment is kept on
    each rank before compression, where momentum factor masking clears it once sent; the
    optimizer then adds none of its own and scales the step by ``1 - m`` (the velocity
    sums ``1 / (1 - m)`` gradients).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        hook: SparseHookState,
    ) -> None:
        check_nonnegative("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Expected argument `betas` to be a pair of floats in [0, 1), but got {betas!r}.")
        check_probability("betas[0]", betas[0])
        check_nonnegative("weight_decay", weight_decay)
        if not isinstance(hook, SparseHookState):
            raise ValueError(
                "Expected argument `hook` to be the SparseHookState registered on the model "
                f"(what gradsparse.register_sparse_hook returns), but got {hook!r}."
            )
        preconditioner = AdamPreconditioner(betas[1], eps)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        hook.precondition(preconditioner)
        self.hook = hook

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One AdamW step from the averaged, already normalised gradients: the first
        moment, its bias correction, and decoupled weight decay."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, beta1 = group["lr"], group["weight_decay"], group["betas"][0]
            corrected = self.hook.options.momentum  # the hook keeps the first moment
            if corrected:
                beta1, lr = 0.0, lr * (1.0 - corrected)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SparseAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg = state["exp_avg"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(exp_avg, alpha=-lr / (1.0 - beta1 ** float(state["step"])))
        return loss
