"""How masks are chosen: a table of named criteria.

Every criterion prunes by magnitude (the smallest weights go; pruned weights never come
back by pruning). Those that regrow also swap, at constant density, the smallest active
weights for inactive ones scored by their growth function: RigL (Evci et al., ICML 2020)
by gradient magnitude, SET (Mocanu et al. 2018) at random. Ties go to the lower index, so
every rank computes the same masks from the same weights."""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional

import torch

__all__ = ["CRITERIA", "GROWTH", "keep_largest", "magnitude_masks", "swap_masks"]

#: scores of the inactive weights that regrowth may grow: (parameter, its name, generator)
GrowthScore = Callable[[torch.Tensor, str, torch.Generator], torch.Tensor]


def _by_gradient(p: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    if p.grad is None:
        raise RuntimeError(f"RigL regrowth needs the gradient of {name!r}; call step() after backward()")
    return p.grad.detach().abs().reshape(-1).float()


def _at_random(p: torch.Tensor, name: str, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(p.numel(), generator=gen).to(p.device)


#: criterion name -> its growth score (None: prune only)
GROWTH: Dict[str, Optional[GrowthScore]] = {"magnitude": None, "rigl": _by_gradient, "set": _at_random}
#: the criteria's names
CRITERIA = tuple(GROWTH)


def keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A mask of the ``keep`` largest scores; ties go to the lower index."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        mask[order] = True
    return mask.view_as(scores)


def magnitude_masks(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], sparsity: float, per_parameter: bool
) -> Dict[str, torch.Tensor]:
    """Masks at ``sparsity`` by weight magnitude, each parameter on its own or under one
    global threshold; masked weights score below every active one, so they stay masked."""
    scores = {n: torch.where(masks[n], p.detach().abs(), torch.full_like(p, -1.0)) for n, p in params.items()}
    if per_parameter:
        return {n: keep_largest(s, s.numel() - math.floor(sparsity * s.numel())) for n, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    mask = keep_largest(flat, flat.numel() - math.floor(sparsity * flat.numel()))
    out, offset = {}, 0
    for name in names:
        n = scores[name].numel()
        out[name] = mask[offset : offset + n].view_as(scores[name])
        offset += n
    return out


def swap_masks(
    p: torch.Tensor, name: str, mask: torch.Tensor, fraction: float, growth: GrowthScore, gen: torch.Generator
) -> Optional[torch.Tensor]:
    """``mask`` with the ``fraction`` smallest active weights dropped and as many inactive
    ones grown (the best ``growth`` scores); None when nothing is swapped."""
    flat = mask.reshape(-1)
    active = int(flat.sum())
    swap = min(math.floor(fraction * active), flat.numel() - active)
    if swap <= 0:
        return None
    weight = p.detach().abs().reshape(-1)
    dropped = keep_largest(torch.where(flat, -weight, torch.full_like(weight, -math.inf)), swap)
    scores = growth(p, name, gen)
    grown = keep_largest(torch.where(flat, torch.full_like(scores, -math.inf), scores), swap)
    return ((flat & ~dropped) | grown).view_as(mask)
