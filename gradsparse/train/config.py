"""What one ``gradsparse-train`` invocation runs: the configuration mini-language of
``--compare`` and the typed :class:`TrainConfig` that :func:`~gradsparse.train.train` takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gradsparse import compressors
from gradsparse.comm import available as available_collectives

__all__ = ["BASELINE_NAMES", "RunConfig", "TrainConfig", "UsageError", "parse_config"]


class UsageError(ValueError):
    """Bad command-line input: reported as one line, without a traceback."""


@dataclass(frozen=True)
class RunConfig:
    """One configuration of a comparison: ``compressor`` None is DDP's own allreduce, or
    ``baseline`` (one of PyTorch's hooks, :mod:`gradsparse.baselines`); ``collective``
    None is the run's ``--collective``."""

    label: str
    compressor: Optional[str]
    params: Dict[str, float] = field(default_factory=dict)
    error_feedback: bool = True
    baseline: Optional[str] = None
    collective: Optional[str] = None
    #: with ``--optimizer sparse_adamw``: how many steps its warm-up sends as signs; None:
    #: its own count (``SparseAdamW``'s default), 0: none, the warm-up sent dense instead
    #: (``+nosigns``), N: exactly N (``+signs=N``)
    sign_steps: Optional[int] = None


#: the configurations that are one of PyTorch's own hooks (``powersgd`` takes its rank)
BASELINE_NAMES = ("noop", "bf16", "fp16", "powersgd")
#: a configuration's ``+FLAG``s (``signs=N`` takes a count)
FLAGS = ("noef", "nosigns", "signs=N")


def parse_config(spec: str) -> RunConfig:
    """``NAME[:VALUE][@COLLECTIVE][+FLAG...]`` -> RunConfig, validated by building the
    compressor. VALUE sets the compressor's budget parameter (density, threshold, alpha);
    COLLECTIVE overrides ``--collective`` for this configuration; the flags are ``+noef`` (no
    error feedback), ``+nosigns`` (SparseAdamW's warm-up sent dense, not as signs) and
    ``+signs=N`` (its warm-up's first N steps sent as signs, then the compressor). ``dense``
    is DDP's own allreduce; ``noop``, ``bf16``, ``fp16`` and ``powersgd[:RANK]`` are PyTorch's hooks."""
    label = spec.strip()
    body, *flags = label.split("+")
    unknown = [f for f in flags if f not in FLAGS and not f.startswith("signs=")]
    if unknown:
        raise UsageError(f"configuration {label!r}: unknown flag '+{unknown[0]}' (allowed: {', '.join(FLAGS)})")
    signs = _sign_steps(label, flags)
    body, _, collective = body.partition("@")
    name, _, value = body.partition(":")
    if name == "dense" or name in BASELINE_NAMES:
        return _baseline(label, name, value, "+".join(flags) or collective)
    if name not in compressors.available():
        raise UsageError(
            f"configuration {label!r}: unknown compressor {name!r}; expected one of "
            f"{['dense', *BASELINE_NAMES, *compressors.available()]}"
        )
    if collective and collective not in available_collectives():
        raise UsageError(
            f"configuration {label!r}: unknown collective {collective!r}; expected one of {available_collectives()}"
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
    return RunConfig(
        label, name, params, error_feedback="noef" not in flags, collective=collective or None, sign_steps=signs,
    )  # fmt: skip


def _sign_steps(label: str, flags: List[str]) -> Optional[int]:
    """``+nosigns``: 0; ``+signs=N``: N; neither: None (SparseAdamW's own count)."""
    counts = [f.partition("=")[2] for f in flags if f.startswith("signs=")]
    if len(counts) + ("nosigns" in flags) > 1:
        raise UsageError(f"configuration {label!r}: give one of +nosigns and +signs=N")
    if not counts:
        return 0 if "nosigns" in flags else None
    if not counts[0].isdigit():
        raise UsageError(f"configuration {label!r}: +signs=N takes a count of steps, got {counts[0]!r}")
    return int(counts[0])


def _baseline(label: str, name: str, value: str, extra: str) -> RunConfig:
    if extra or (value and name != "powersgd"):
        raise UsageError(f"configuration {label!r}: {name!r} takes no value, collective or flag")
    if name == "dense":
        return RunConfig(label, None)
    if name == "powersgd":
        if value and (not value.isdigit() or int(value) < 1):
            raise UsageError(f"configuration {label!r}: PowerSGD's rank must be a positive integer, got {value!r}")
        return RunConfig(label, None, baseline=f"powersgd{int(value or 1)}")
    return RunConfig(label, None, baseline=name)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, validated by the CLI (see ``gradsparse-train --help``)."""

    runs: Tuple[RunConfig, ...]
    seeds: Tuple[int, ...] = (0,)
    model: str = "cnn"
    collective: str = "allgather"
    dense_steps: Optional[int] = None  # None: 0, or SparseAdamW's own warm-up
    mask_sparsity: float = 0.0
    mask_criterion: str = "magnitude"
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: Optional[float] = None  # None: the model's default for the optimizer (gradsparse.train.tasks)
    weight_decay: Optional[float] = None
    schedule: Optional[str] = None  # "constant" or "onecycle"; None: the model's default
    eval_every: int = 0  # steps between evaluations; 0: at the end of every epoch
    max_steps: int = 0  # stop after this many steps (0: --epochs full epochs)
    out: Path = Path("runs/train")
    checkpoint_every: int = 0
    resume: bool = False
    ranks: int = 4
    max_restarts: int = 0
    timeout: float = 300.0
    tensorboard: Optional[str] = None
    verbose: bool = False
