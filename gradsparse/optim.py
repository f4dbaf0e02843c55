"""Optimizers for compressed gradients with error feedback.

:class:`SparseAdamW` is AdamW split in two around the communication: its moments are taken
on each rank, of the rank's own dense gradient, before compression
(:mod:`gradsparse.precondition`, installed into the hook's state); the learning rate and
weight decay are applied here, to the averaged result::

    state = gradsparse.register_sparse_hook(ddp, "sign")
    opt = gradsparse.optim.SparseAdamW(ddp.parameters(), lr=1e-3, weight_decay=0.1, hook=state)

With every gradient sent (density 1) it is AdamW with each rank's second moment in place
of the global one. Why AdamW itself fails with sparse gradients is in
:mod:`gradsparse.precondition`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import torch

from gradsparse.checks import check_choice, check_nonnegative, check_probability
from gradsparse.ddp import SparseHookState
from gradsparse.precondition import AdamPreconditioner

__all__ = ["SparseAdamW"]


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose moments are applied by the sparse hook, before compression.

    Args:
        params: the parameters, or parameter groups, as for ``torch.optim.AdamW``.
        lr: the learning rate, as ``torch.optim.AdamW``'s.
        betas: Adam's decays; ``betas[1]`` goes to the hook's preconditioner.
        eps: added to the second moment's root, in the hook's preconditioner.
        weight_decay: decoupled weight decay, as ``torch.optim.AdamW``'s.
        hook: the :class:`~gradsparse.SparseHookState` registered on the DDP model whose
            parameters these are (or the Horovod optimizer's ``hook_state``).
        first_moment: ``"local"`` (default): each rank keeps the first moment of its own
            normalised gradient before compression, and what is compressed is Adam's
            update direction; ``"global"``: the first moment is taken here, of the
            averaged result (this class's behaviour before 0.x; measured worse).
        vector_first_moment: with ``first_moment="local"``, whether parameters of fewer
            than two dimensions (biases, norms) keep a first moment too. Default no: they
            are updated by their normalised gradient, which measured 1.1% against 7.4% over
            dense on the quality benchmark with ``sign`` (docs/optimizers.md).

    With the hook's DGC momentum correction (``momentum=m``), the first moment is the
    hook's velocity, where momentum factor masking clears it once sent; the optimizer
    then keeps none, ``first_moment`` is not used, and the step is scaled by ``1 - m``
    (the velocity sums ``1 / (1 - m)`` gradients).
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
        first_moment: str = "local",
        vector_first_moment: bool = False,
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
        check_choice("first_moment", first_moment, ("local", "global"))
        #: the first moment is kept by the hook's preconditioner, before compression
        self.local_first_moment = first_moment == "local" and not hook.options.momentum
        preconditioner = AdamPreconditioner(
            betas[1], eps, betas[0] if self.local_first_moment else 0.0, vector_first_moment=vector_first_moment
        )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        if self.local_first_moment:
            self._shared_beta1()
        hook.precondition(preconditioner)
        self.hook = hook

    def _shared_beta1(self) -> float:
        """The groups' ``betas[0]``, which the hook's one preconditioner applies to all."""
        found = {float(group["betas"][0]) for group in self.param_groups}
        if len(found) > 1:
            raise ValueError(
                "Expected every parameter group of SparseAdamW to have the same `betas[0]` with "
                f"first_moment='local' (one first moment is kept before compression), but got {sorted(found)}."
            )
        return found.pop()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One AdamW step from the averaged, already normalised gradients: decoupled weight
        decay, and the first moment with its bias correction unless the hook keeps it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.local_first_moment:  # for the next gradients, as a momentum schedule set it now
            assert self.hook.preconditioner is not None
            self.hook.preconditioner.beta1 = self._shared_beta1()
        for group in self.param_groups:
            lr, wd, beta1 = group["lr"], group["weight_decay"], group["betas"][0]
            corrected = self.hook.options.momentum  # the hook keeps the first moment
            if corrected:
                beta1, lr = 0.0, lr * (1.0 - corrected)
            elif self.local_first_moment:
                beta1 = 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SparseAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                state["step"] += 1
                if wd:
                    p.mul_(1.0 - lr * wd)
                if not beta1:  # the gradient is the update direction already
                    p.add_(p.grad, alpha=-lr)
                    continue
                exp_avg = state.setdefault("exp_avg", torch.zeros_like(p))
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                p.add_(exp_avg, alpha=-lr / (1.0 - beta1 ** float(state["step"])))
        return loss
