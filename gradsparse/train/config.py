"""What one ``gradsparse-train`` invocation runs: the configuration mini-language of
``--compare`` and the typed :class:`TrainConfig` that :func:`~gradsparse.train.train` takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from gradsparse import compressors

__all__ = ["RunConfig", "TrainConfig", "UsageError", "parse_config"]


class UsageError(ValueError):
    """Bad command-line input: reported as one line, without a traceback."""


@dataclass(frozen=True)
class RunConfig:
    """One configuration of a comparison: ``compressor`` None is DDP's own allreduce."""

    label: str
    compressor: Optional[str]
    params: Dict[str, float] = field(default_factory=dict)
    error_feedback: bool = True


def parse_config(spec: str) -> RunConfig:
    """``NAME[:VALUE][+noef]`` -> RunConfig, validated by building the compressor. VALUE
    sets the compressor's budget parameter (density, threshold, alpha)."""
    label = spec.strip()
    body, _, flag = label.partition("+")
    if flag not in ("", "noef"):
        raise UsageError(f"configuration {label!r}: unknown flag '+{flag}' (only '+noef' is allowed)")
    name, _, value = body.partition(":")
    if name == "dense":
        if value or flag:
            raise UsageError(f"configuration {label!r}: 'dense' takes no value or flag")
        return RunConfig(label, None)
    if name not in compressors.available():
        raise UsageError(
            f"configuration {label!r}: unknown compressor {name!r}; expected one of "
            f"{['dense', *compressors.available()]}"
        )
    params: Dict[str, float] = {}
    if value:
        budget = compressors.registry.get(name).budget_param
        if budget is None:
            raise UsageError(f"configuration {label!r}: {name!r} takes no value")
        try:
            params[budget] = float(value)
        except ValueError:
            raise UsageError(f"configuration {label!r}: {value!r} is not a number") from None
    try:
        compressors.build(name, **params)
    except ValueError as exc:
        raise UsageError(f"configuration {label!r}: {exc}") from None
    return RunConfig(label, name, params, error_feedback=flag != "noef")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, validated by the CLI (see ``gradsparse-train --help``)."""

    runs: Tuple[RunConfig, ...]
    seeds: Tuple[int, ...] = (0,)
    model: str = "cnn"
    collective: str = "allgather"
    dense_steps: int = 0
    mask_sparsity: float = 0.0
    mask_criterion: str = "magnitude"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    out: Path = Path("runs/train")
    checkpoint_every: int = 0
    resume: bool = False
    ranks: int = 4
    max_restarts: int = 0
    timeout: float = 300.0
    tensorboard: Optional[str] = None
    verbose: bool = False
