"""Carry the hook's state across a change of world size: N ranks' ``state_dict`` s in, M out.

What the next updates receive is preserved: with P ranks the pending update of a parameter
is the mean of its residuals over the ranks (each rank sends its residual eventually, and
the hook averages), so for every parameter the mean over the new ranks equals the mean over
the old ones, up to float rounding. Residuals are not just averaged: rank j of M takes the
block of old ranks that covers [j/M, (j+1)/M) of [0, 1) (old rank i covers [i/N, (i+1)/N)),
scaled by M/N, so a rank's large pending entries stay together and are sent as such.

* residuals and DGC momentum: resharded as above (in float64, then back to their dtype);
* the variance compressor's per-coordinate statistics: reset, with a logged warning;
* scalars (a reused threshold) and statistics: from the old rank that covers most of the
  new rank's block; the step: shared;
* the preconditioner's second moments (:class:`gradsparse.optim.SparseAdamW`), each rank's
  own estimate of the gradient's scale: from the old rank that covers most of the block;
* weight masks are the same on every rank and live outside the hook's state: they carry over.

    new_states = gradsparse.reshard_states([torch.load(f) for f in old_files], world_size=3)
    state.load_state_dict(new_states[rank])
"""

from __future__ import annotations

import logging
from fractions import Fraction
from typing import Any, Dict, List, Sequence

import torch

from gradsparse.checks import check_int
from gradsparse.engine.saving import STATE_FORMAT

__all__ = ["reshard_states", "shares"]

logger = logging.getLogger(__name__)


def shares(old: int, new: int) -> List[List[Fraction]]:
    """``w[i][j]``: the fraction of old rank i's interval [i/old, (i+1)/old) that falls in
    new rank j's [j/new, (j+1)/new). Every row sums to 1."""
    w = []
    for i in range(old):
        lo, hi = Fraction(i, old), Fraction(i + 1, old)
        row = []
        for j in range(new):
            overlap = min(hi, Fraction(j + 1, new)) - max(lo, Fraction(j, new))
            row.append(max(overlap, Fraction(0)) * old)
        w.append(row)
    return w


def _check(states: Sequence[Dict[str, Any]]) -> None:
    if not states:
        raise ValueError("Expected argument `states` to hold at least one rank's state_dict, but got none.")
    for r, s in enumerate(states):
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            raise ValueError(f"states[{r}] is not a SparseHookState state_dict (format {STATE_FORMAT!r})")
    for key in ("compressor", "step"):
        seen = {s[key] for s in states}
        if len(seen) != 1:
            raise ValueError(f"the ranks' states disagree on `{key}`: {sorted(map(str, seen))}; were they one run's?")


def _sizes(stores: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """One example tensor per name (a rank may lack a name that others have: zeros there)."""
    like: Dict[str, torch.Tensor] = {}
    for store in stores:
        for name, t in store.items():
            if name in like and like[name].shape != t.shape:
                raise ValueError(f"ranks hold {name!r} with shapes {tuple(like[name].shape)} and {tuple(t.shape)}")
            like.setdefault(name, t)
    return like


def _reshard_store(
    stores: Sequence[Dict[str, torch.Tensor]], scales: List[Dict[str, float]], new: int
) -> List[Dict[str, torch.Tensor]]:
    old = len(stores)
    w = shares(old, new)
    out: List[Dict[str, torch.Tensor]] = [{} for _ in range(new)]
    for name, like in _sizes(stores).items():
        target = scales[0].get(name, 1.0)  # express every rank's state in one loss scale
        pieces = [
            s[name].double() * (target / scales[i].get(name, target))
            if name in s
            else torch.zeros_like(like, dtype=torch.float64)
            for i, s in enumerate(stores)
        ]
        for j in range(new):
            acc = torch.zeros_like(like, dtype=torch.float64)
            for i in range(old):
                if w[i][j]:
                    acc.add_(pieces[i], alpha=float(w[i][j] * new / old))
            out[j][name] = acc.to(like.dtype)
    return out


def _largest(w: List[List[Fraction]], j: int) -> int:
    """The old rank that covers most of new rank j's block."""
    best = 0
    for i in range(len(w)):
        if w[i][j] > w[best][j]:
            best = i
    return best


def reshard_states(states: Sequence[Dict[str, Any]], world_size: int) -> List[Dict[str, Any]]:
    """The per-rank :meth:`SparseHookState.state_dict` s of one run on ``len(states)`` ranks,
    resharded for ``world_size`` ranks (see the module's docstring for what is preserved)."""
    _check(states)
    new = check_int("world_size", world_size, minimum=1)
    old = len(states)
    if new == old:
        return [dict(s) for s in states]
    w = shares(old, new)
    main = [_largest(w, j) for j in range(new)]
    feedback = [s["error_feedback"] for s in states]
    scales = [dict(f.get("scales", {})) for f in feedback]
    residuals = _reshard_store([f.get("residuals", {}) for f in feedback], scales, new)
    velocity = None
    if any("velocity" in f for f in feedback):
        velocity = _reshard_store([f.get("velocity", {}) for f in feedback], scales, new)
    reset = any(s.get("compressor_buffers") and any(s["compressor_buffers"].values()) for s in states)
    if reset:
        logger.warning(
            "resharding from %d to %d ranks resets the %r compressor's per-coordinate statistics",
            old, new, states[0]["compressor"],
        )  # fmt: skip
    out = []
    for j in range(new):
        src = states[main[j]]
        ef: Dict[str, Any] = {"residuals": residuals[j], "scales": dict(scales[0])}
        if velocity is not None:
            ef["velocity"] = velocity[j]
        out.append(
            {
                **src,
                "error_feedback": ef,
                "compressor_buffers": {k: {} for k in src.get("compressor_buffers", {})},
                # per-coordinate statistics go, and with them the scalars that count them
                "compressor_scalars": {} if reset else {k: dict(v) for k, v in src["compressor_scalars"].items()},
                "stats": dict(src["stats"]),
            }
        )
    return out
