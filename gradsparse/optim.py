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

__all__ = ["DENSE_STEPS", "SIGN_STEPS", "SparseAdamW"]

logger = logging.getLogger(__name__)

#: the fewest steps of SparseAdamW's default warm-up (in signs with top-k, else dense), which
#: goes on while the learning rate rises (docs/optimizers.md)
DENSE_STEPS = 50
#: then, with top-k, this many times as many more steps of signs (about 1.06 bits per
#: coordinate) before top-k sends (measured against a dense start, DGC's density ramp and
#: shorter sign warm-ups: docs/optimizers.md)
SIGN_STEPS = 6


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
        sign_steps: Adam's warm-up with top-k: the hook's first steps go as ``sign`` sends
            them (one bit per coordinate). None (default): the first :data:`DENSE_STEPS` and
            every step while the learning rate rises, then :data:`SIGN_STEPS` times as many
            more; N: that many; 0: those first steps go dense (as with other compressors).
        dense_steps: N: the first N steps dense, then ``SIGN_STEPS * N`` of signs; 0: no
            warm-up. Without one, error feedback holds Adam's first, largest steps back.

    With the hook's DGC momentum correction (``momentum=m``) the first moment is the hook's
    velocity (``first_moment`` unused), and the step is scaled by ``1 - m``.
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
        sign_steps: Optional[int] = None,
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
        self.warm_up = _WarmUp(dense_steps, sign_steps)
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


class _WarmUp:
    """SparseAdamW's warm-up of the hook. With a density-based compressor (top-k) and by
    default it is all signs: the first :data:`DENSE_STEPS` steps and every step while the
    learning rate rises, then :data:`SIGN_STEPS` times as many more. Otherwise (or with
    ``sign_steps=0``) those first steps go dense. ``dense_steps=N`` sends N dense steps and
    then ``SIGN_STEPS * N`` of signs; ``sign_steps`` sets the signs' count."""

    def __init__(self, steps: Optional[int], signs: Optional[int]) -> None:
        self.steps = None if steps is None else check_int("dense_steps", steps)
        self.signs = None if signs is None else check_int("sign_steps", signs)
        self.last_lr: Optional[float] = None  # set while the warm-up follows a rising learning rate
        self.in_signs = False  # whether the part that follows the learning rate is sent as signs

    def begin(self, hook: SparseHookState) -> None:
        if hook.compressor.sends_every_entry:
            return
        can_sign = self.signs != 0 and hook.compressor.density_based and not hook.options.momentum
        following = self.steps is None and not (can_sign and self.signs)  # sign_steps=N: exactly N
        self.in_signs = following and can_sign
        self.last_lr = -math.inf if following else None
        start = hook.options.start_step  # the hook's own dense steps stay, and are followed on from
        if self.in_signs:
            hook.warm_up(start, signs=DENSE_STEPS)
        elif self.steps is None and not can_sign:
            hook.warm_up(DENSE_STEPS)
        elif self.steps:
            hook.warm_up(self.steps)
        how = "as 1-bit signs" if self.in_signs else "dense"
        first = hook.options.sign_warmup_steps if self.in_signs else hook.options.start_step
        if first:
            logger.info(
                "SparseAdamW: the hook sends the first %d steps %s%s (Adam's warm-up)",
                first, how, ", and then while the learning rate rises" if following else "",
            )  # fmt: skip
        if not following and can_sign:
            steps = SIGN_STEPS * hook.options.start_step if self.signs is None else self.signs
            self._then_signs(hook, steps)

    def follow(self, hook: SparseHookState, lr: float) -> None:
        """After a step at ``lr``: the next step is in the warm-up too while ``lr`` still
        rises (the same decision on every rank)."""
        if self.last_lr is None:
            return
        options = hook.options
        if lr > self.last_lr:
            self.last_lr = lr
            if self.in_signs:
                hook.warm_up(options.start_step, signs=max(0, hook.step + 1 - options.start_step))
            else:
                hook.warm_up(hook.step + 1)
        elif hook.step >= options.start_step + (options.sign_warmup_steps if self.in_signs else 0):
            self.last_lr = None
            if self.in_signs:
                followed = options.sign_warmup_steps
                logger.info("SparseAdamW: the learning rate rose for %d steps of signs", followed)
                self._then_signs(hook, (1 + SIGN_STEPS) * followed)
            else:
                logger.info("SparseAdamW: warm-up over after %d dense steps", options.start_step)

    @staticmethod
    def _then_signs(hook: SparseHookState, steps: int) -> None:
        """The sign warm-up after the dense steps, ``steps`` long in all."""
        if not steps:
            return
        hook.warm_up(hook.options.start_step, signs=steps)
        start, end = hook.options.start_step, hook.options.start_step + hook.options.sign_warmup_steps
        logger.info(
            "SparseAdamW: the hook sends steps %d to %d as 1-bit signs, and %s from step %d",
            start, end - 1, hook.compressor.name, end,
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
