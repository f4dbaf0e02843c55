"""Argument checks shared by the public constructors (messages name the argument,
what was given, and what is allowed)."""

from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional, Tuple

import torch

__all__ = [
    "check_choice",
    "check_density",
    "check_int",
    "check_named_parameters",
    "check_nonnegative",
    "check_probability",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_density(name: str, value: Any, *, allow_none: bool = False) -> Optional[float]:
    """A fraction in (0, 1]."""
    if value is None and allow_none:
        return None
    if not _is_real(value) or not (0.0 < float(value) <= 1.0) or math.isnan(float(value)):
        raise ValueError(f"Expected argument `{name}` to be a float in (0, 1], but got {value!r}.")
    return float(value)


def check_probability(name: str, value: Any, *, closed_high: bool = False) -> float:
    """A fraction in [0, 1) (or [0, 1] with ``closed_high``)."""
    ok = _is_real(value) and not math.isnan(float(value)) and float(value) >= 0.0
    ok = ok and (float(value) <= 1.0 if closed_high else float(value) < 1.0)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"Expected argument `{name}` to be a float in [0, 1{bracket}, but got {value!r}.")
    return float(value)


def check_nonnegative(name: str, value: Any, *, positive: bool = False) -> float:
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) < 0 or (positive and float(value) == 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"Expected argument `{name}` to be {kind} finite number, but got {value!r}.")
    return float(value)


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Expected argument `{name}` to be an int >= {minimum}, but got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"Expected argument `{name}` to be one of {list(choices)}, but got {value!r}.")
    return value


def check_named_parameters(named_parameters: Any) -> List[Tuple[str, torch.Tensor]]:
    """(name, parameter) pairs, as ``model.named_parameters()`` produces them."""
    pairs = list(named_parameters) if isinstance(named_parameters, Iterable) else None
    if not pairs or not all(
        isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], torch.Tensor)
        for pair in pairs
    ):
        raise ValueError(
            "Expected argument `named_parameters` to be (name, parameter) pairs, "
            "usually produced by `model.named_parameters()`."
        )
    return pairs
