"""Weight-mask sparsity for data-parallel training.

:class:`WeightMasker` keeps one boolean mask per prunable parameter (weight matrices and
convolution kernels; biases and norms are left dense), prunes on a schedule, optionally
regrows, and keeps masked weights exactly zero whatever the optimizer does. Registered
with the sparse hook (``SparseHookState(masker=...)``) it also shrinks communication:
masks are identical on every rank, so the hook sends only the active coordinates' values
(no indices at all) and selects gradients among active coordinates only.

One concern per module: :mod:`~gradsparse.masking.schedule` says when masks change (one-shot
or Zhu and Gupta's gradual cubic ramp; RigL's regrowth cadence), :mod:`~gradsparse.masking.criteria`
how (a table of named criteria: magnitude pruning, per parameter or global; RigL and SET
regrowth), and :class:`WeightMasker` holds the masks and applies them.

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
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from gradsparse.checks import check_choice, check_int

from .criteria import CRITERIA, GROWTH, magnitude_masks, swap_masks
from .schedule import MaskSchedule

__all__ = [
    "CRITERIA",
    "MaskSchedule",
    "WeightMasker",
    "export",
    "flat_mask",
    "mask_optimizer_state",
    "prunable_parameters",
    "sparsity_report",
]

logger = logging.getLogger(__name__)

_FORMAT = "gradsparse.WeightMasker/1"


def prunable_parameters(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Weight matrices and convolution kernels: parameters with two or more dimensions.
    Biases and norm scales (one dimension) stay dense."""
    return [(n, p) for n, p in module.named_parameters() if p.dim() >= 2]


class WeightMasker:
    """Boolean masks for a module's prunable parameters, kept by a schedule and a criterion.

    Args:
        module: the model (the DDP model's ``.module``, or the model itself).
        sparsity: final fraction of pruned weights, in [0, 1).
        criterion: ``"magnitude"`` (prune only), ``"rigl"`` or ``"set"`` (prune, then regrow).
        scope: ``"layer"`` (each parameter reaches ``sparsity``) or ``"global"`` (one threshold).
        schedule: ``"oneshot"`` (prune at ``start_step``) or ``"gradual"`` (cubic).
        start_step: when pruning starts.
        end_step: when the gradual schedule reaches ``sparsity`` (default ``start_step``).
        frequency: how often the gradual schedule prunes, in steps.
        regrow_every: how often RigL/SET swap weights (after ``end_step``).
        regrow_fraction: the fraction of active weights a swap moves, decaying with a cosine.
        regrow_until: the step after which nothing regrows (default: never stop).
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
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        self.plan = MaskSchedule(
            sparsity, schedule, start_step, end_step, frequency, GROWTH[criterion] is not None,
            regrow_every, regrow_fraction, regrow_until,
        )  # fmt: skip
        self.scope = check_choice("scope", scope, ("layer", "global"))
        self.seed = check_int("seed", seed)
        self.params: Dict[str, nn.Parameter] = _chosen(module, names)
        self.masks: Dict[str, torch.Tensor] = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.steps = 0
        self.version = 0  # bumped whenever a mask changes (the hook caches on it)
        if self.plan.schedule == "oneshot" and self.plan.start_step == 0:
            self._prune(self.plan.sparsity)
            self.apply()

    @property
    def sparsity(self) -> float:
        return self.plan.sparsity

    def target_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for at ``step``."""
        return self.plan.target_sparsity(step)

    def needs_dense_gradients(self) -> bool:
        """Whether the next :meth:`step` regrows with RigL, which needs the dense gradient of
        masked weights: the hook then sends the whole bucket for this one step."""
        return self.criterion == "rigl" and self.plan.regrows_at(self.steps + 1)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights."""
        for name, p in self.params.items():
            p.mul_(self.masks[name])

    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight state at masked entries (see :func:`mask_optimizer_state`)."""
        mask_optimizer_state(self, optimizer)

    def step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Call after ``optimizer.step()``: keep masked weights at zero, advance the schedule
        (prune, regrow) and return whether any mask changed."""
        self.steps += 1
        changed = False
        if self.plan.prunes_at(self.steps):
            changed = self._prune(self.plan.target_sparsity(self.steps))
        elif self.plan.regrows_at(self.steps):
            changed = self._regrow(self.steps)
        self.apply()
        if optimizer is not None:
            self.mask_optimizer_state(optimizer)
        return changed

    @torch.no_grad()
    def _prune(self, sparsity: float) -> bool:
        new = magnitude_masks(self.params, self.masks, sparsity, per_parameter=self.scope == "layer")
        changed = any(not torch.equal(self.masks[n], new[n]) for n in self.masks)
        self.masks = new
        if changed:
            self.version += 1
            logger.info("pruned to %.4f sparsity at step %d", self.global_sparsity(), self.steps)
        return changed

    @torch.no_grad()
    def _regrow(self, step: int) -> bool:
        """Swap weights at constant density; grown weights start at zero, as in RigL."""
        growth = GROWTH[self.criterion]
        assert growth is not None  # the schedule regrows only for criteria that grow
        fraction = self.plan.swap_fraction(step)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        changed = False
        for name, p in self.params.items():
            new = swap_masks(p, name, self.masks[name], fraction, growth, gen)
            if new is None:
                continue
            p[new & ~self.masks[name]] = 0.0
            self.masks[name] = new
            changed = True
        if changed:
            self.version += 1
        return changed

    def global_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def sparsity_report(self) -> Dict[str, float]:
        """Per-parameter sparsity, and ``"global"``."""
        return sparsity_report(self)

    def export(self, module: nn.Module, to_sparse: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """See :func:`export`."""
        return export(self, module, to_sparse)

    def state_dict(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "steps": self.steps, "masks": {n: m.clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not a WeightMasker state_dict (expected format {_FORMAT!r})")
        for name, mask in _checked_masks(state["masks"], self.masks).items():
            self.masks[name] = mask.to(self.masks[name].device).clone()
        self.steps = int(state["steps"])
        self.version += 1
        self.apply()


def _chosen(module: nn.Module, names: Optional[Sequence[str]]) -> Dict[str, nn.Parameter]:
    candidates = dict(prunable_parameters(module))
    if names is not None:
        everything = dict(module.named_parameters())
        unknown = [n for n in names if n not in everything]
        if unknown:
            raise ValueError(
                f"parameter name(s) {unknown} do not exist in the module; prunable ones are {sorted(candidates)}"
            )
        candidates = {n: everything[n] for n in names}
    if not candidates:
        raise ValueError("the module has no prunable parameters (weights with two or more dimensions)")
    return candidates


def _checked_masks(masks: Dict[str, torch.Tensor], mine: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if set(masks) != set(mine):
        raise ValueError(f"masks are for parameters {sorted(masks)}, this masker has {sorted(mine)}")
    for name, mask in masks.items():
        if mask.shape != mine[name].shape or mask.dtype != torch.bool:
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(mine[name].shape)}")
    return masks


@torch.no_grad()
def mask_optimizer_state(masker: WeightMasker, optimizer: torch.optim.Optimizer) -> None:
    """Zero the optimizer's per-weight state (momentum, Adam moments) at ``masker``'s masked
    entries, so that a weight that is regrown later starts clean."""
    by_id = {id(p): name for name, p in masker.params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                continue
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(masker.masks[name])


def flat_mask(masker: WeightMasker, names: Iterable[str], numels: Iterable[int], device: torch.device) -> torch.Tensor:
    """The concatenated masks of ``names`` (all-true for parameters without a mask)."""
    parts = [
        masker.masks[n].reshape(-1).to(device) if n in masker.masks else torch.ones(k, dtype=torch.bool, device=device)
        for n, k in zip(names, numels)
    ]
    return torch.cat(parts) if parts else torch.ones(0, dtype=torch.bool, device=device)


def sparsity_report(masker: WeightMasker) -> Dict[str, float]:
    """Per-parameter sparsity of ``masker``'s masks, and ``"global"``."""
    report = {n: 1.0 - float(m.float().mean()) for n, m in masker.masks.items()}
    report["global"] = masker.global_sparsity()
    return report


@torch.no_grad()
def export(
    masker: WeightMasker, module: nn.Module, to_sparse: bool = False
) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """A pruned state_dict of ``module`` (masks applied; with ``to_sparse`` the pruned
    weights as ``torch.sparse_coo`` tensors) and the sparsity report."""
    pruned: Dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        t = tensor.detach().clone()
        if name in masker.masks:
            t = t * masker.masks[name]
            if to_sparse:
                t = t.to_sparse()
        pruned[name] = t
    return pruned, sparsity_report(masker)
