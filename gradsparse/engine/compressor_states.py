"""The select stage's state: compressor state keyed by parameter name.

A compressor is stateless; what it remembers between steps lives here. Per selection key
(a bucket's set of parameters with ``scope="bucket"``, one parameter with ``"layer"``) a
:class:`~gradsparse.compressors.CompressorState` holds scalars (a reused threshold) and
scratch buffers; per-coordinate buffers (the variance compressor's) are kept per parameter
name in :class:`~gradsparse.store.ParamStore` s, so they survive DDP's bucket rebuild."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from gradsparse.compressors import Compressor, CompressorState
from gradsparse.payload import Candidates, SparsePayload, index_dtype_for
from gradsparse.store import Layout, ParamStore

__all__ = ["CompressorStates"]


class CompressorStates:
    """Compressor state by selection key, per-coordinate buffers by parameter name."""

    def __init__(self, compressor: Compressor, scope: str) -> None:
        self.scope = scope
        self.buffers: Dict[str, ParamStore] = {n: ParamStore() for n in compressor.state_buffers}
        self.states: Dict[str, CompressorState] = {}

    def _state(self, key: str, layout: Layout, like: torch.Tensor, step: int) -> CompressorState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = CompressorState(key=key)
        state.step = step
        state.buffers = {name: store.flat(layout, like) for name, store in self.buffers.items()}
        return state

    def _pieces(self, key: str, layout: Layout, tensor: torch.Tensor) -> Iterator[Tuple[str, Layout, torch.Tensor]]:
        """(selection key, layout, slice) for each unit that is selected on its own."""
        if self.scope == "bucket" or len(layout) <= 1:
            yield key, layout, tensor
            return
        offset = 0
        for name, n in layout:
            yield name, ((name, n),), tensor[offset : offset + n]
            offset += n

    def observe(self, compressor: Compressor, key: str, layout: Layout, region: torch.Tensor, step: int) -> None:
        """Show the fresh gradient to a compressor that keeps per-coordinate state."""
        if not self.buffers:
            return
        for unit, unit_layout, piece in self._pieces(key, layout, region):
            compressor.observe(piece, self._state(unit, unit_layout, piece, step))

    def candidate_floor(
        self,
        compressor: Compressor,
        key: str,
        layout: Layout,
        like: torch.Tensor,
        values_at: Callable[[torch.Tensor], torch.Tensor],
    ) -> Optional[float]:
        """The compressor's candidate floor for ``key`` when it is selected as one unit
        (None otherwise, or when the compressor has none)."""
        if compressor.state_buffers or (self.scope != "bucket" and len(layout) > 1):
            return None
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = CompressorState(key=key)
        return compressor.candidate_floor(state, like, values_at)

    def exact_count(self, compressor: Compressor, layout: Layout, numel: int) -> Optional[int]:
        """How many entries :meth:`compress` returns over ``numel`` entries laid out as
        ``layout``, when that does not depend on the values (None otherwise)."""
        pieces = [numel] if self.scope == "bucket" or len(layout) <= 1 else [n for _, n in layout]
        counts = [compressor.exact_count(n) for n in pieces]
        return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)

    def compress(
        self,
        compressor: Compressor,
        key: str,
        layout: Layout,
        work: torch.Tensor,
        step: int,
        large: Optional[Candidates] = None,
    ) -> SparsePayload:
        """Select over ``work`` (laid out as ``layout``), per unit of the scope. ``large``:
        the candidates of ``work`` at or above a floor, for a single unit only; the
        compressor gets them on a copy of the unit's state made for this call (its scalars
        and scratch are the state's own)."""
        pieces = list(self._pieces(key, layout, work))
        if len(pieces) == 1:
            unit, unit_layout, piece = pieces[0]
            state = self._state(unit, unit_layout, piece, step)
            return compressor.compress(piece, state if large is None else dataclasses.replace(state, large=large))
        indices, values = [], []
        offset = 0
        for unit, unit_layout, piece in pieces:
            payload = compressor.compress(piece, self._state(unit, unit_layout, piece, step))
            indices.append(payload.indices.long() + offset)
            values.append(payload.values)
            offset += piece.numel()
        numel = work.numel()
        return SparsePayload(torch.cat(indices).to(index_dtype_for(numel)), torch.cat(values), numel)

    # Saving and pickling ----------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "compressor_buffers": {k: store.state_dict() for k, store in self.buffers.items()},
            "compressor_scalars": {k: dict(s.scalars) for k, s in self.states.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, store in self.buffers.items():
            store.load_state_dict(state["compressor_buffers"].get(name, {}))
        self.states = {
            k: CompressorState(key=k, scalars={n: float(v) for n, v in scalars.items()})
            for k, scalars in state["compressor_scalars"].items()
        }

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["states"] = {k: dataclasses.replace(s, scratch={}) for k, s in self.states.items()}
        return state
