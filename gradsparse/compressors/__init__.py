"""Gradient compressors: stateless objects that select part of a flat tensor.

``build(name, **params)`` makes one by name; ``available()`` lists the names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Type

from gradsparse.compressors.base import Compressor, CompressorState, k_for_density
from gradsparse.compressors.block_quantize import BlockQuantizer
from gradsparse.compressors.identity import NoCompression
from gradsparse.compressors.randomk import RandomK
from gradsparse.compressors.scaled_sign import ScaledSign
from gradsparse.compressors.threshold import Threshold
from gradsparse.compressors.topk import SampledTopK, TopK
from gradsparse.compressors.variance import VarianceBased
from gradsparse.registry import Registry

__all__ = [
    "BlockQuantizer",
    "Compressor",
    "CompressorState",
    "NoCompression",
    "RandomK",
    "SampledTopK",
    "ScaledSign",
    "Threshold",
    "TopK",
    "VarianceBased",
    "available",
    "build",
    "k_for_density",
    "registry",
]

registry: Registry[Type[Compressor]] = Registry("compressor")
for _cls in (TopK, SampledTopK, Threshold, VarianceBased, RandomK, ScaledSign, BlockQuantizer, NoCompression):
    registry.register(_cls.name)(_cls)


def available() -> List[str]:
    """Names accepted by :func:`build`."""
    return registry.names()


def build(name: str, **params: Any) -> Compressor:
    """Build the compressor ``name`` with its parameters, validated now.

    >>> build("topk", density=0.01)
    TopK(density=0.01)
    """
    cls = registry.get(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"compressor {name!r} got unknown parameter(s) {unknown}; it accepts {fields}")
    return cls(**params)
