"""One bit per coordinate: the sign, times the mean magnitude of its block (scaled sign,
as in 1-bit Adam and EF-signSGD).

Every coordinate is sent every step, so none waits for its turn the way a top-k coordinate
does; what the bit cannot say (the magnitude within a block) stays in error feedback and
is sent in the next steps. For a block ``x`` of ``block`` entries the decoded values are
``sign(x) * mean(|x|)`` (zero counts as positive), the scaled sign closest to ``x`` in
the least-squares sense, with the scale rounded to bfloat16 (it has float32's range; the
rounding is error feedback's to keep, like the rest). A block of zeros decodes to zeros.
Given the sizes of the tensors a flat buffer holds (:meth:`ScaledSign.blocks_of`), blocks
never straddle two of them: each tensor's magnitudes get their own scales, and a tensor
with no gradient (a parameter no forward used) decodes to zeros, not to its neighbours'
scale.

The message of ``n`` entries is ``ceil(n / 8)`` bytes of packed signs and one bfloat16
scale per block (``ceil(n / block)`` for one tensor; 1.06 bits per entry at the default
block of 256); the
sign route (:mod:`gradsparse.engine.routes.sign`) gathers it with an equal-size allgather
and sums the decoded messages in rank order. Pair it with
:class:`gradsparse.optim.SparseAdamW` for AdamW (docs/optimizers.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import torch

from gradsparse.checks import check_int
from gradsparse.compressors.base import Compressor, CompressorState
from gradsparse.payload import SparsePayload, index_dtype_for

__all__ = ["ScaledSign", "SignBlocks", "pack_codes", "pack_signs", "unpack_codes", "unpack_signs"]

_SHIFTS: Dict[Tuple[int, torch.device], torch.Tensor] = {}  # made once per (bits, device)


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    """Where each of a byte's ``8 // bits`` codes starts (no host-to-device copy per step)."""
    key = (bits, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
    return _SHIFTS[key]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``ceil(n * bits / 8)`` bytes of the ``n`` uint8 ``codes`` (each below ``2**bits``;
    ``bits`` 1, 2, 4 or 8): code ``i`` from bit ``(i % per) * bits`` of byte ``i // per``,
    ``per = 8 // bits`` (at 8 bits, ``codes`` itself)."""
    per, n = 8 // bits, codes.numel()
    if per == 1:
        return codes
    padded = torch.zeros((n + per - 1) // per * per, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    return (padded.view(-1, per) << _shifts(bits, codes.device)).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """The ``numel`` uint8 codes of :func:`pack_codes`' bytes."""
    if bits == 8:
        return packed[:numel]
    codes = (packed.unsqueeze(1) >> _shifts(bits, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel]


def pack_signs(values: torch.Tensor) -> torch.Tensor:
    """``ceil(n / 8)`` bytes: bit ``i % 8`` of byte ``i // 8`` is set when ``values[i] >= 0``
    (or is NaN: its scale says so)."""
    return pack_codes((~(values < 0)).to(torch.uint8), 1)


def unpack_signs(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` signs (+1 or -1, of ``dtype``) from :func:`pack_signs`' bytes."""
    return unpack_codes(packed, numel, 1).to(dtype).mul_(2).sub_(1)


@dataclass(frozen=True)
class SignBlocks:
    """How a flat buffer of ``numel`` entries splits into scaled-sign blocks: ``count``
    blocks, each tensor's own (the last block of each is short). ``ids`` gives each entry's
    block and ``sizes`` each block's entries; both are None when the blocks are the plain
    ``block``-sized runs of the buffer (every tensor but the last a multiple of ``block``).
    ``owners`` gives each block's tensor (of ``tensors``; None: one tensor)."""

    numel: int
    count: int
    ids: Optional[torch.Tensor] = None
    sizes: Optional[torch.Tensor] = None
    owners: Optional[torch.Tensor] = None
    tensors: int = 1


@dataclass(frozen=True)
class ScaledSign(Compressor):
    """Every entry as one bit, its sign, times its block's mean magnitude.

    Args:
        block: entries per scale (a bfloat16 each). Smaller blocks fit the magnitudes more
            closely and send more scales: 256 adds 1/16 of a bit per entry.
    """

    block: int = 256
    name = "sign"
    #: the route that carries it: packed bits, not (index, value) pairs
    route = "sign"
    sends_every_entry = True

    def __post_init__(self) -> None:
        check_int("block", self.block, minimum=1)

    def blocks(self, numel: int) -> SignBlocks:
        """The blocks of one tensor of ``numel`` entries."""
        return SignBlocks(numel, (numel + self.block - 1) // self.block)

    def blocks_of(self, sizes: Sequence[int], device: torch.device) -> SignBlocks:
        """The blocks of a flat buffer holding tensors of ``sizes`` entries, one after
        another: none straddles two tensors. Made once per buffer layout."""
        sizes = [int(n) for n in sizes if n]
        numel, block = sum(sizes), self.block
        per_tensor = [(n + block - 1) // block for n in sizes]
        owners = torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.tensor(per_tensor, dtype=torch.int64, device=device)
        )
        if all(n % block == 0 for n in sizes[:-1]):
            return replace(self.blocks(numel), owners=owners, tensors=len(sizes))
        runs = [c for n in sizes for c in [block] * (n // block) + ([n % block] if n % block else [])]
        counts = torch.tensor(runs, dtype=torch.int64, device=device)
        ids = torch.repeat_interleave(torch.arange(len(runs), device=device), counts)
        return SignBlocks(numel, len(runs), ids, counts, owners, len(sizes))

    def per_block(self, values: torch.Tensor, blocks: SignBlocks, reduce: str = "sum") -> torch.Tensor:
        """Each block's ``"sum"`` or ``"amax"`` of the flat ``values`` (float), without a
        padded copy of the buffer."""
        if blocks.ids is not None:
            out = torch.zeros(blocks.count, dtype=values.dtype, device=values.device)
            if reduce == "sum":
                return out.index_add_(0, blocks.ids, values)
            return out.scatter_reduce_(0, blocks.ids, values, "amax")
        whole = values.numel() - values.numel() % self.block
        head = values[:whole].view(-1, self.block)
        heads = head.sum(dim=1) if reduce == "sum" else head.amax(dim=1)
        if whole == values.numel():
            return heads
        tail = values[whole:]
        return torch.cat([heads, (tail.sum() if reduce == "sum" else tail.amax()).reshape(1)])

    def scales(self, values: torch.Tensor, blocks: Optional[SignBlocks] = None) -> torch.Tensor:
        """Each block's mean magnitude (over the entries it has), as bfloat16."""
        blocks = blocks or self.blocks(values.numel())
        sums = self.per_block(values.abs(), blocks)
        if blocks.sizes is not None:
            return sums.div_(blocks.sizes).to(torch.bfloat16)
        short = values.numel() % self.block  # the last block's own count, if it is short
        last = sums[-1:] / short if short else None
        means = sums.div_(self.block)
        if last is not None:
            means[-1:] = last
        return means.to(torch.bfloat16)

    def idle_tensors(self, grads: torch.Tensor, blocks: SignBlocks) -> torch.Tensor:
        """Per tensor of ``blocks``, whether its entries of the flat ``grads`` are all zero
        (a parameter that received no gradient; NaN counts as nonzero), on the device: one
        read pass."""
        per_block = self.per_block(grads.ne(0).to(torch.float32), blocks)
        if blocks.owners is None:
            return (per_block.sum() == 0).reshape(1)
        return torch.zeros(blocks.tensors, device=grads.device).index_add_(0, blocks.owners, per_block) == 0

    def code_bits(self) -> int:
        """Bits per entry in the message (before the block scales)."""
        return 1

    def packed_bytes(self, numel: int) -> int:
        """The size of the packed codes of ``numel`` entries."""
        return (numel * self.code_bits() + 7) // 8

    def encode(
        self, values: torch.Tensor, blocks: Optional[SignBlocks] = None, idle: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(packed codes, block scales) of the flat ``values``; the blocks of the tensors
        ``idle`` flags (from :meth:`idle_tensors`) are sent with a zero scale: nothing of
        them, their error feedback whole."""
        scales = self.scales(values, blocks)
        if idle is not None and scales.numel():
            owners = blocks.owners if blocks is not None else None
            scales.masked_fill_(idle[owners] if owners is not None else idle.expand(scales.shape), 0.0)
        return self._pack(values, scales, blocks), scales

    def _pack(self, values: torch.Tensor, scales: torch.Tensor, blocks: Optional[SignBlocks]) -> torch.Tensor:
        del scales, blocks
        return pack_signs(values)

    def decode(
        self,
        signs: torch.Tensor,
        scales: torch.Tensor,
        numel: int,
        dtype: torch.dtype = torch.float32,
        blocks: Optional[SignBlocks] = None,
    ) -> torch.Tensor:
        """The ``numel`` values, of ``dtype``, that ``(codes, scales)`` stand for."""
        return self.by_block_(self._unpack(signs, numel, dtype), scales, blocks)

    def by_block_(
        self, values: torch.Tensor, scales: torch.Tensor, blocks: Optional[SignBlocks], divide: bool = False
    ) -> torch.Tensor:
        """The flat ``values`` times (or, with ``divide``, over) each entry's block scale, in
        place; regular blocks without a copy of the scales per entry."""
        scales, apply = scales.to(values.dtype), (torch.Tensor.div_ if divide else torch.Tensor.mul_)
        if blocks is not None and blocks.ids is not None:
            return apply(values, scales.index_select(0, blocks.ids))
        numel = values.numel()
        whole = numel - numel % self.block
        apply(values[:whole].view(-1, self.block), scales[: numel // self.block].unsqueeze(1))
        if numel % self.block:
            apply(values[whole:], scales[-1])
        return values

    def _unpack(self, packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Each entry's multiple of its block's scale (here +1 or -1)."""
        return unpack_signs(packed, numel, dtype)

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        """Every entry, at its decoded value (for paths that carry (index, value) pairs;
        the sign route sends the packed form)."""
        flat = self._check_input(tensor)
        n = flat.numel()
        indices = torch.arange(n, dtype=index_dtype_for(n), device=flat.device)
        return SparsePayload(indices, self.decode(*self.encode(flat), n, dtype=flat.dtype), n)
