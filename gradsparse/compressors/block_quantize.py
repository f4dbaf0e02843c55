"""A few bits per coordinate: each entry rounded to one of ``2**bits - 1`` evenly spaced
levels of its block's largest magnitude (block-wise absmax quantisation, as 8-bit
optimisers store their moments, and a deterministic QSGD).

Like :class:`~gradsparse.compressors.ScaledSign` (its 1-bit case, which it extends) every
coordinate is sent every step and what the levels cannot say stays in error feedback; it
travels on the same route (packed codes and one bfloat16 scale per block, blocks that never
straddle two tensors, an equal-size allgather, sums in rank order). For a block ``x`` with
``L = 2**(bits - 1) - 1`` the scale is ``s = max|x| / L`` (rounded to bfloat16) and the
decoded values are ``s * clamp(round(x / s), -L, L)``: ternary at 2 bits, 15 levels at 4,
255 at 8. A block of zeros (or a tensor with no gradient) decodes to zeros.

The message of ``n`` entries is ``ceil(n * bits / 8)`` bytes of codes and one bfloat16
scale per block: at the default block of 256, 4.06 bits per entry at ``bits=4``. Pair it
with :class:`gradsparse.optim.SparseAdamW` (docs/optimizers.md): what it then encodes is
Adam's update direction, of one scale within a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gradsparse.checks import check_choice
from gradsparse.compressors.scaled_sign import ScaledSign, SignBlocks, pack_codes, unpack_codes

__all__ = ["BlockQuantizer"]

#: the code widths a byte holds a whole number of
BITS = (2, 4, 8)


@dataclass(frozen=True)
class BlockQuantizer(ScaledSign):
    """Every entry as ``bits`` bits, one of ``2**bits - 1`` levels of its block's largest
    magnitude.

    Args:
        bits: bits per entry, 2, 4 or 8 (1 is the ``sign`` compressor).
        block: entries per scale (a bfloat16 each).
    """

    bits: int = 4
    name = "quantize"
    budget_param = "bits"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("bits", self.bits, BITS)
        object.__setattr__(self, "bits", int(self.bits))  # 4.0 from a command line is 4

    def levels(self) -> int:
        """L: the codes stand for ``-L..L`` times the scale."""
        return (1 << (self.bits - 1)) - 1

    def code_bits(self) -> int:
        return self.bits

    def scales(self, values: torch.Tensor, blocks: Optional[SignBlocks] = None) -> torch.Tensor:
        """Each block's largest magnitude over L, as bfloat16 (NaN when it holds a NaN)."""
        peaks = self.per_block(values.abs(), blocks or self.blocks(values.numel()), "amax")
        return peaks.div_(self.levels()).to(torch.bfloat16)

    def _pack(self, values: torch.Tensor, scales: torch.Tensor, blocks: Optional[SignBlocks]) -> torch.Tensor:
        levels = self.levels()
        # the sent scale (bfloat16) sets the levels. Over a zero scale (a block of zeros, an idle
        # parameter's) the codes say zero; a NaN's block scale is NaN (the flag word says so)
        level = self.by_block_(values.clone(), scales, blocks, divide=True).nan_to_num_(0.0, 0.0, 0.0)
        level.round_().clamp_(-levels, levels).add_(levels)
        return pack_codes(level.to(torch.uint8), self.bits)

    def _unpack(self, packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return unpack_codes(packed, numel, self.bits).to(dtype).sub_(self.levels())
