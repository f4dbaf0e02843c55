"""The compressor interface.

A compressor is a small immutable object holding only its hyperparameters. It turns a
flat 1-D tensor into a :class:`~gradsparse.payload.SparsePayload`. Anything a
compressor wants to remember between steps (a reused threshold, a variance estimate)
lives in a :class:`CompressorState` that the caller owns, saves and restores; the
compressor itself never keeps state and knows nothing about communication.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch

from gradsparse.buffers import reusable
from gradsparse.payload import Candidates, SparsePayload, index_dtype_for

__all__ = ["Compressor", "CompressorState", "k_for_density", "make_payload"]


@dataclass
class CompressorState:
    """What one selection key (a parameter, or a bucket's set of parameters) keeps.

    ``buffers`` hold per-coordinate float tensors named in the compressor's
    ``state_buffers``; the hook keeps them keyed by parameter name so they survive DDP's
    bucket rebuild. ``scalars`` are small numbers such as a reused threshold. ``scratch``
    holds preallocated work buffers that are never saved.

    ``large`` is a hint a caller may pass for one :meth:`Compressor.compress` call (on a
    copy of the state made for that call): :class:`~gradsparse.payload.Candidates`, the
    ascending positions of *every* entry of the tensor with ``|x| >= floor``. Selection at
    a threshold at or above the floor then reads only those entries; the result is the
    same as without the hint.
    """

    key: str = ""
    step: int = 0
    seed: int = 0
    buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: Dict[str, float] = field(default_factory=dict)
    scratch: Dict[str, torch.Tensor] = field(default_factory=dict)
    large: Optional[Candidates] = None

    def work(self, name: str, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A reusable scratch buffer shaped like ``like`` (reallocated only on change)."""
        return reusable(self.scratch, name, like.shape, like, dtype)


def k_for_density(density: float, numel: int) -> int:
    """k = max(1, ceil(density * numel)), computed in decimal so that 0.01 * 100 is 1."""
    if numel <= 0:
        return 0
    return max(1, min(numel, math.ceil(Decimal(repr(float(density))) * numel)))


def make_payload(tensor: torch.Tensor, indices: torch.Tensor, *, ascending: bool = False) -> SparsePayload:
    """A payload of ``tensor``'s values at ``indices``, sorted ascending here unless the
    caller says they already are."""
    numel = tensor.numel()
    if indices.numel() > 1 and not ascending:
        indices = torch.sort(indices).values
    values = torch.index_select(tensor, 0, indices.long())
    return SparsePayload(indices.to(index_dtype_for(numel)), values, numel)


@dataclass(frozen=True)
class Compressor(ABC):
    """Select and encode part of a flat tensor. Subclasses are frozen dataclasses whose
    ``__post_init__`` validates every parameter."""

    name: ClassVar[str] = ""
    #: names of per-coordinate buffers this compressor keeps in ``CompressorState.buffers``
    state_buffers: ClassVar[Tuple[str, ...]] = ()
    #: True when the compressor's budget is ``density`` (so the density ramp can scale it)
    density_based: ClassVar[bool] = False
    #: the parameter that sets how much is sent (``density``, ``threshold``, ``alpha``), if any
    budget_param: ClassVar[Optional[str]] = None
    #: about how many read+write passes over the tensor selection costs (for ``auto``)
    selection_passes: ClassVar[float] = 4.0
    #: the route that must carry this compressor's messages (None: the collective's own)
    route: ClassVar[Optional[str]] = None
    #: True when every entry is sent at every step (coarsely, maybe): error feedback then
    #: holds nothing back for long (SparseAdamW's warm-up is for the others)
    sends_every_entry: ClassVar[bool] = False

    def candidate_floor(
        self, state: CompressorState, like: torch.Tensor, values_at: Callable[[torch.Tensor], torch.Tensor]
    ) -> Optional[float]:
        """A magnitude the next selection will most likely not go below, or None (default).
        The tensor to select from does not exist yet: ``like`` has its size and device, and
        ``values_at(positions)`` gives its values at a few positions (the hook computes
        them from the gradient and the residual). A caller that then passes over the tensor
        gathers the entries at or above the floor into ``state.large``; selection is the
        same, only faster. A wrong guess costs time, never correctness."""
        del state, like, values_at
        return None

    def exact_count(self, numel: int) -> Optional[int]:
        """How many entries :meth:`compress` selects from ``numel`` entries, when that does
        not depend on the values (every rank then knows every rank's count without asking,
        and collectives can skip their header exchange); None (default) when it does."""
        del numel
        return None

    def observe(self, grad: torch.Tensor, state: CompressorState) -> None:
        """See the fresh (uncompensated) gradient before compression. Default: nothing."""
        del grad, state

    @abstractmethod
    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        """Select entries of the flat ``tensor``; the payload's values are copies."""

    @staticmethod
    def _check_input(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"Expected argument `tensor` to be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"Expected argument `tensor` to be floating point, got {tensor.dtype}")
        return tensor.reshape(-1)
