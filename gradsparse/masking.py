"""Weight-mask sparsity for data-parallel training.

:class:`WeightMasker` keeps one boolean mask per prunable parameter (weight matrices and
convolution kernels; biases and norms are left dense), prunes on a schedule, optionally
regrows, and keeps masked weights exactly zero whatever the optimizer does. Registered
with the sparse hook (``SparseHookState(masker=...)``) it also shrinks communication:
masks are identical on every rank, so the hook sends only the active coordinates' values
(no indices at all) and selects gradients among active coordinates only.

Criteria: magnitude pruning, layer-wise or global; RigL regrowth (Evci et al., ICML 2020:
every ``regrow_every`` steps drop the smallest active weights and grow the inactive ones
with the largest gradient magnitude, at constant density); SET regrowth (Mocanu et al.
2018: grow at random). Schedules: one-shot at ``start_step``, or gradual with the cubic
schedule of Zhu and Gupta (2017) from ``start_step`` to ``end_step`` every ``frequency``
steps.

Masks are computed from weights that DDP keeps identical on every rank, with ties broken
by index, and SET draws from a generator seeded by (seed, step): every rank computes the
same masks without communicating. RigL needs the dense gradient of masked weights on
regrowth steps; the hook exchanges it on exactly those steps (:meth:`needs_dense_gradients`).

Use::

    masker = WeightMasker(model, sparsity=0.9, schedule="gradual", end_step=1000)
    state = gs.register_sparse_hook(ddp, "topk", density=0.01, masker=masker)
    for batch in data:
        loss(batch).backward(); opt.step(); masker.step(opt)
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from gradsparse.checks import check_choice, check_int, check_probability

__all__ = ["CRITERIA", "WeightMasker", "prunable_parameters"]

#: how masks are chosen: magnitude pruning only, or pruning with RigL or SET regrowth
CRITERIA = ("magnitude", "rigl", "set")

logger = logging.getLogger(__name__)

_FORMAT = "gradsparse.WeightMasker/1"


def prunable_parameters(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Weight matrices and convolution kernels: parameters with two or more dimensions.
    Biases and norm scales (one dimension) stay dense."""
    return [(n, p) for n, p in module.named_parameters() if p.dim() >= 2]


class WeightMasker:
    """Boolean masks for a module's prunable parameters, and the schedule that sets them.

    Args:
        module: the model (the DDP model's ``.module``, or the model itself).
        sparsity: final fraction of pruned weights, in [0, 1).
        criterion: ``"magnitude"`` (prune only), ``"rigl"`` or ``"set"`` (prune, then regrow).
        scope: ``"layer"`` (each parameter reaches ``sparsity``) or ``"global"`` (one threshold).
        schedule: ``"oneshot"`` (prune at ``start_step``) or ``"gradual"`` (cubic).
        start_step, end_step, frequency: when the gradual schedule prunes.
        regrow_every, regrow_fraction: how often and how much RigL/SET swap (after
            ``end_step`` for gradual schedules; the swap fraction decays with a cosine, as in RigL).
        names: prune only these parameters (default: every prunable one).
        seed: SET's random regrowth seed.
    """

    def __init__(
        self,
        module: nn.Module,
        sparsity: float,
        *,
        criterion: str = "magnitude",
        scope: str = "layer",
        schedule: str = "oneshot",
        start_step: int = 0,
        end_step: Optional[int] = None,
        frequency: int = 100,
        regrow_every: int = 100,
        regrow_fraction: float = 0.3,
        regrow_until: Optional[int] = None,
        names: Optional[Sequence[str]] = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"Expected argument `module` to be a torch.nn.Module, but got {type(module).__name__}.")
        self.sparsity = check_probability("sparsity", sparsity)
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        self.scope = check_choice("scope", scope, ("layer", "global"))
        self.schedule = check_choice("schedule", schedule, ("oneshot", "gradual"))
        self.start_step = check_int("start_step", start_step)
        self.end_step = self.start_step if end_step is None else check_int("end_step", end_step)
        if self.end_step < self.start_step:
            raise ValueError(f"Expected `end_step` >= `start_step` ({self.start_step}), but got {end_step}.")
        self.frequency = check_int("frequency", frequency, minimum=1)
        self.regrow_every = check_int("regrow_every", regrow_every, minimum=1)
        self.regrow_fraction = check_probability("regrow_fraction", regrow_fraction, closed_high=True)
        self.regrow_until = regrow_until
        self.seed = check_int("seed", seed)
        candidates = dict(prunable_parameters(module))
        all_names = dict(module.named_parameters())
        if names is not None:
            unknown = [n for n in names if n not in all_names]
            if unknown:
                raise ValueError(
                    f"parameter name(s) {unknown} do not exist in the module; prunable ones are {sorted(candidates)}"
                )
            candidates = {n: all_names[n] for n in names}
        if not candidates:
            raise ValueError("the module has no prunable parameters (weights with two or more dimensions)")
        self.params: Dict[str, nn.Parameter] = candidates
        self.masks: Dict[str, torch.Tensor] = {n: torch.ones_like(p, dtype=torch.bool) for n, p in candidates.items()}
        self.steps = 0
        self.version = 0  # bumped whenever a mask changes (the hook caches on it)
        if self.schedule == "oneshot" and self.start_step == 0:
            self._prune(self.sparsity)
            self.apply()

    # Schedule ------------------------------------------------------------------------------

    def target_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for at ``step`` (Zhu & Gupta's cubic ramp)."""
        if step < self.start_step:
            return 0.0
        if self.schedule == "oneshot" or step >= self.end_step:
            return self.sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return self.sparsity * (1.0 - (1.0 - progress) ** 3)

    def _prune_due(self, step: int) -> bool:
        if self.schedule == "oneshot":
            return step == self.start_step
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.frequency == 0 or step == self.end_step
        )

    def _regrow_due(self, step: int) -> bool:
        if self.criterion == "magnitude" or step <= self.end_step or self.sparsity == 0:
            return False
        if self.regrow_until is not None and step >= self.regrow_until:
            return False
        return step % self.regrow_every == 0

    def needs_dense_gradients(self) -> bool:
        """Whether the next :meth:`step` regrows with RigL, which needs the dense gradient of
        masked weights: the hook then sends the whole bucket for this one step."""
        return self.criterion == "rigl" and self._regrow_due(self.steps + 1)

    # Applying -------------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights."""
        for name, p in self.params.items():
            p.mul_(self.masks[name])

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight state (momentum, Adam moments) at masked entries,
        so that a weight that is regrown later starts clean."""
        by_id = {id(p): name for name, p in self.params.items()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = by_id.get(id(p))
                if name is None:
                    continue
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        value.mul_(self.masks[name])

    def step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Call after ``optimizer.step()``: keep masked weights at zero, advance the schedule
        (prune, regrow) and return whether any mask changed."""
        self.steps += 1
        changed = False
        if self._prune_due(self.steps):
            changed = self._prune(self.target_sparsity(self.steps))
        elif self._regrow_due(self.steps):
            changed = self._regrow(self.steps)
        self.apply()
        if optimizer is not None:
            self.mask_optimizer_state(optimizer)
        return changed

    # Criteria -------------------------------------------------------------------------------

    @staticmethod
    def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
        """A mask of the ``keep`` largest scores; ties go to the lower index."""
        flat = scores.reshape(-1)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if keep > 0:
            order = torch.sort(flat, descending=True, stable=True).indices[:keep]
            mask[order] = True
        return mask.view_as(scores)

    @torch.no_grad()
    def _prune(self, sparsity: float) -> bool:
        """Magnitude pruning to ``sparsity``; pruned weights never come back here (only
        regrowth brings weights back)."""
        old = {n: m.clone() for n, m in self.masks.items()}
        scores = {
            n: torch.where(self.masks[n], p.detach().abs(), torch.full_like(p, -1.0)) for n, p in self.params.items()
        }
        if self.scope == "layer":
            for name, score in scores.items():
                keep = score.numel() - math.floor(sparsity * score.numel())
                self.masks[name] = self._keep_largest(score, keep)
        else:
            names = list(scores)
            flat = torch.cat([scores[n].reshape(-1).float() for n in names])
            keep = flat.numel() - math.floor(sparsity * flat.numel())
            mask = self._keep_largest(flat, keep)
            offset = 0
            for name in names:
                n = scores[name].numel()
                self.masks[name] = mask[offset : offset + n].view_as(scores[name])
                offset += n
        changed = any(not torch.equal(old[n], self.masks[n]) for n in self.masks)
        if changed:
            self.version += 1
            logger.info("pruned to %.4f sparsity at step %d", self.global_sparsity(), self.steps)
        return changed

    def _swap_fraction(self, step: int) -> float:
        end = self.regrow_until
        if end is None or end <= self.end_step:
            return self.regrow_fraction
        return self.regrow_fraction / 2 * (1 + math.cos(math.pi * (step - self.end_step) / (end - self.end_step)))

    @torch.no_grad()
    def _regrow(self, step: int) -> bool:
        """Drop the smallest active weights, grow as many inactive ones (largest gradient
        for RigL, random for SET); grown weights start at zero. Density is unchanged."""
        fraction = self._swap_fraction(step)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        changed = False
        for name, p in self.params.items():
            mask = self.masks[name].reshape(-1)
            active = int(mask.sum())
            swap = min(math.floor(fraction * active), mask.numel() - active)
            if swap <= 0:
                continue
            weight = p.detach().abs().reshape(-1)
            # drop: the `swap` smallest active weights (ties to the lower index)
            drop_scores = torch.where(mask, -weight, torch.full_like(weight, -math.inf))
            dropped = self._keep_largest(drop_scores, swap)
            if self.criterion == "rigl":
                if p.grad is None:
                    raise RuntimeError(f"RigL regrowth needs the gradient of {name!r}; call step() after backward()")
                grow_scores = p.grad.detach().abs().reshape(-1).float()
            else:
                grow_scores = torch.rand(mask.numel(), generator=gen).to(weight.device)
            grow_scores = torch.where(mask, torch.full_like(grow_scores, -math.inf), grow_scores)
            grown = self._keep_largest(grow_scores, swap)
            new = (mask & ~dropped) | grown
            p.view(-1)[grown] = 0.0  # grown weights start from zero, as in RigL
            self.masks[name] = new.view_as(p)
            changed = True
        if changed:
            self.version += 1
        return changed

    # Reporting, checkpointing, export ----------------------------------------------------

    def sparsity_report(self) -> Dict[str, float]:
        """Per-parameter sparsity, and ``"global"``."""
        report = {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items()}
        report["global"] = self.global_sparsity()
        return report

    def global_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def flat_mask(self, names: Iterable[str], numels: Iterable[int], device: torch.device) -> torch.Tensor:
        """The concatenated masks of ``names`` (all-true for parameters without a mask)."""
        parts = [
            self.masks[n].reshape(-1).to(device) if n in self.masks else torch.ones(k, dtype=torch.bool, device=device)
            for n, k in zip(names, numels)
        ]
        return torch.cat(parts) if parts else torch.ones(0, dtype=torch.bool, device=device)

    def state_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "steps": self.steps, "masks": {n: m.clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not a WeightMasker state_dict (expected format {_FORMAT!r})")
        masks = state["masks"]
        if set(masks) != set(self.masks):
            raise ValueError(f"masks are for parameters {sorted(masks)}, this masker has {sorted(self.masks)}")
        for name, mask in masks.items():
            if mask.shape != self.masks[name].shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(self.masks[name].shape)}"
                )
            self.masks[name] = mask.to(self.masks[name].device).clone()
        self.steps = int(state["steps"])
        self.version += 1
        self.apply()

    @torch.no_grad()
    def export(self, module: nn.Module, to_sparse: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """A pruned state_dict of ``module`` (masks applied; with ``to_sparse`` the pruned
        weights as ``torch.sparse_coo`` tensors) and the sparsity report."""
        pruned: Dict[str, torch.Tensor] = {}
        for name, tensor in module.state_dict().items():
            t = tensor.detach().clone()
            if name in self.masks:
                t = t * self.masks[name]
                if to_sparse:
                    t = t.to_sparse()
            pruned[name] = t
        return pruned, self.sparsity_report()
