"""Optimizers for compressed gradients with error feedback.

:class:`SparseAdamW` is AdamW split in two around the communication: its moments are taken
on each rank, of the rank's own dense gradient, before compression
(:mod:`gradsparse.precondition`, installed into the hook's state); the learning rate and
weight decay are applied here, to the averaged result::

    state = gradsparse.register_sparse_hook(ddp, "sign")
    opt = gradsparse.optim.SparseAdamW(ddp.parameters(), lr=1e-3, weight_decay=0.1, hook=state)

Where the hook is registered by a framework integration after the optimizer is built
(Lightning's ``configure_optimizers``, the HF Trainer), build it without ``hook``: the
integration attaches its state (:meth:`SparseAdamW.attach`) before the first step.

Gradient clipping after the hook (``clip_grad_norm_``, Lightning's ``gradient_clip_val``,
the HF Trainer's ``max_grad_norm``) would clip Adam's update direction, not the gradient:
leave it off (the integrations refuse it); Adam's normalisation bounds each coordinate's
step already.

With every gradient sent (density 1) it is AdamW with each rank's estimate of the averaged
gradient's second moment in place of that moment itself. Why AdamW itself fails with
sparse gradients is in :mod:`gradsparse.precondition`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from gradsparse.checks import check_choice, check_int, check_nonnegative, check_probability
from gradsparse.ddp import SparseHookState
from gradsparse.precondition import AdamPreconditioner

__all__ = ["DENSE_STEPS", "RAMP_BELOW", "SparseAdamW"]

logger = logging.getLogger(__name__)

#: the fewest steps of SparseAdamW's default warm-up, sent dense (docs/optimizers.md)
DENSE_STEPS = 50
#: below this density the warm-up's dense steps are followed by DGC's density ramp, over
#: twice as many steps (measured to pay at 0.1% and 1%, not at 10%: docs/optimizers.md)
RAMP_BELOW = 0.05


class SparseAdamW(torch.optim.Optimizer):
    """AdamW whose moments are applied by the sparse hook, before compression.

    Args:
        params: the parameters, or parameter groups, as for ``torch.optim.AdamW``.
        lr: the learning rate, as ``torch.optim.AdamW``'s.
        betas: Adam's decays; ``betas[1]`` goes to the hook's preconditioner.
        eps: added to the second moment's root, in the hook's preconditioner.
        weight_decay: decoupled weight decay, as ``torch.optim.AdamW``'s.
        hook: the :class:`~gradsparse.SparseHookState` registered on the DDP model whose
            parameters these are (or the Horovod optimizer's ``hook_state``); or None, and
            :meth:`attach` it before the first step (the integrations do).
        first_moment: ``"local"`` (default): each rank keeps the first moment of its own
            normalised gradient before compression, and what is compressed is Adam's
            update direction; ``"global"``: the first moment is taken here, of the
            averaged result (this class's behaviour before 0.x; measured worse).
        vector_first_moment: with ``first_moment="local"``, whether biases and norms keep a
            first moment too. Default no (measured better, docs/optimizers.md).
        second_moment: ``"averaged"`` (default): with ``first_moment="local"``, each rank
            estimates the averaged gradient's second moment, which AdamW takes, from its own
            moments, without communicating (:mod:`gradsparse.precondition`); ``"local"``:
            each rank's own, noisier by the rank count (the class before; measured worse).
        dense_steps: Adam's warm-up, where the compressor sends part of the entries (top-k):
            the hook's first steps go dense, as in 1-bit Adam. None (default): the first
            :data:`DENSE_STEPS`, then every step while the (first group's) learning rate
            still rises; an int: that many; 0: none. Below :data:`RAMP_BELOW` DGC's density
            ramp follows, over twice as many steps. Without it error feedback holds Adam's
            first, largest steps back for long (docs/optimizers.md). Saved with the state.

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
        hook: Optional[SparseHookState] = None,
        first_moment: str = "local",
        vector_first_moment: bool = False,
        second_moment: str = "averaged",
        dense_steps: Optional[int] = None,
    ) -> None:
        check_nonnegative("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Expected argument `betas` to be a pair of floats in [0, 1), but got {betas!r}.")
        check_probability("betas[0]", betas[0])
        check_probability("betas[1]", betas[1])
        check_nonnegative("eps", eps, positive=True)
        check_nonnegative("weight_decay", weight_decay)
        check_choice("first_moment", first_moment, ("local", "global"))
        self.first_moment = first_moment
        self.vector_first_moment = bool(vector_first_moment)
        self.second_moment = check_choice("second_moment", second_moment, ("averaged", "local"))
        self.warm_up = _DenseWarmUp(dense_steps)
        #: the first moment is kept by the hook's preconditioner, before compression
        self.local_first_moment = False
        self.hook: Optional[SparseHookState] = None
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._preconditioner_settings(first_moment == "local")  # refuse groups that differ now, not at attach
        if hook is not None:
            self.attach(hook)

    def attach(self, hook: SparseHookState) -> None:
        """Install this optimizer's moments in ``hook`` (the state registered on the DDP
        model whose parameters these are), before the first step."""
        if not isinstance(hook, SparseHookState):
            raise ValueError(
                "Expected argument `hook` to be the SparseHookState registered on the model "
                f"(what gradsparse.register_sparse_hook returns), but got {hook!r}."
            )
        if self.hook is hook:
            return  # attached already (a second fit): its moments stay
        if self.hook is not None:
            raise ValueError("this SparseAdamW is attached to another SparseHookState already")
        self.local_first_moment = self.first_moment == "local" and not hook.options.momentum
        beta1, beta2, eps = self._preconditioner_settings(self.local_first_moment)
        averaged = self.second_moment == "averaged"
        pre = AdamPreconditioner(beta2, eps, beta1, self.vector_first_moment, averaged_second_moment=averaged)
        hook.precondition(pre)
        self.warm_up.begin(hook)
        self.hook = hook

    def _shared_beta1(self) -> float:
        return _shared(self.param_groups, "betas[0]", lambda group: group["betas"][0])

    def _preconditioner_settings(self, first_moment: bool) -> Tuple[float, float, float]:
        """(beta1, or 0 without a first moment; beta2; eps), which every group must share."""
        beta1 = self._shared_beta1() if first_moment else 0.0
        beta2 = _shared(self.param_groups, "betas[1]", lambda group: group["betas"][1])
        return beta1, beta2, _shared(self.param_groups, "eps", lambda group: group["eps"])

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "dense_warm_up": self.warm_up.last_lr}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.warm_up.last_lr = state_dict.get("dense_warm_up", self.warm_up.last_lr)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "dense_warm_up"})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One AdamW step from the averaged, already normalised gradients: decoupled weight
        decay, and the first moment with its bias correction unless the hook keeps it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hook = self.hook
        if hook is None:
            raise RuntimeError(
                "SparseAdamW stepped before a SparseHookState was attached: pass hook= (what "
                "gradsparse.register_sparse_hook returns) or call attach(state), or train with a "
                "gradsparse integration, which attaches it"
            )
        self.warm_up.follow(hook, float(self.param_groups[0]["lr"]))
        if self.local_first_moment:  # for the next gradients, as a momentum schedule set it now
            assert hook.preconditioner is not None
            hook.preconditioner.beta1 = self._shared_beta1()
        for group in self.param_groups:
            lr, wd, beta1 = group["lr"], group["weight_decay"], group["betas"][0]
            corrected = hook.options.momentum  # the hook keeps the first moment
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


class _DenseWarmUp:
    """SparseAdamW's warm-up (its ``dense_steps``): the hook's first steps sent dense."""

    def __init__(self, steps: Optional[int]) -> None:
        self.steps = None if steps is None else check_int("dense_steps", steps)
        self.last_lr: Optional[float] = None  # set while the warm-up follows a rising learning rate

    def begin(self, hook: SparseHookState) -> None:
        first = DENSE_STEPS if self.steps is None else self.steps
        if not first or hook.compressor.sends_every_entry:
            return
        following = self.steps is None
        hook.dense_start(first)  # a later start_step of the hook's own stays, and is followed on from
        logger.info(
            "SparseAdamW: the hook sends the first %d steps dense%s (Adam's warm-up)",
            hook.options.start_step, ", and then while the learning rate rises" if following else "",
        )  # fmt: skip
        self.last_lr = -math.inf if following else None
        if not following:
            self._ramp(hook)

    def follow(self, hook: SparseHookState, lr: float) -> None:
        """After a step at ``lr``: the next step is dense too while ``lr`` still rises (the
        same decision on every rank)."""
        if self.last_lr is None:
            return
        if lr > self.last_lr:
            self.last_lr = lr
            hook.dense_start(hook.step + 1)
        elif hook.step >= hook.options.start_step:
            self.last_lr = None
            logger.info("SparseAdamW: warm-up over after %d dense steps", hook.options.start_step)
            self._ramp(hook)

    @staticmethod
    def _ramp(hook: SparseHookState) -> None:
        """Below :data:`RAMP_BELOW`, the density ramp over twice the dense steps."""
        density = getattr(hook.compressor, "density", None)
        if not hook.compressor.density_based or density is None or density >= RAMP_BELOW:
            return
        hook.dense_start(hook.options.start_step, 2 * hook.options.start_step)
        first = hook.policy.compressor_at(hook.options.start_step)  # the ramp's first step
        logger.info(
            "SparseAdamW: then the density falls from %g to %g over %d steps",
            getattr(first, "density"), density, hook.options.density_warmup_steps,  # noqa: B009 - density-based
        )  # fmt: skip


def _shared(groups: List[Dict[str, Any]], what: str, read: Callable[[Dict[str, Any]], float]) -> float:
    """The groups' ``what``, which the hook's one preconditioner applies to all."""
    found = {float(read(group)) for group in groups}
    if len(found) > 1:
        raise ValueError(
            f"Expected every parameter group of SparseAdamW to have the same `{what}` (one "
            f"preconditioner applies it before compression), but got {sorted(found)}."
        )
    return found.pop()
