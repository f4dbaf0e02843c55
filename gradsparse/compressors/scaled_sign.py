"""One bit per coordinate: the sign, times the mean magnitude of its block (scaled sign,
as in 1-bit Adam and EF-signSGD).

Every coordinate is sent every step, so none waits for its turn the way a top-k coordinate
does; what the bit cannot say (the magnitude within a block) stays in error feedback and
is sent in the next steps. For a block ``x`` of ``block`` entries the decoded values are
``sign(x) * mean(|x|)`` (zero counts as positive), the scaled sign closest to ``x`` in
the least-squares sense, with the scale rounded to bfloat16 (it has float32's range; the
rounding is error feedback's to keep, like the rest). A block of zeros decodes to zeros.

The message of ``n`` entries is ``ceil(n / 8)`` bytes of packed signs and
``ceil(n / block)`` bfloat16 scales (1.06 bits per entry at the default block of 256); the
sign route (:mod:`gradsparse.engine.routes.sign`) gathers it with an equal-size allgather
and sums the decoded messages in rank order. Pair it with
:class:`gradsparse.optim.SparseAdamW` for AdamW (docs/optimizers.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from gradsparse.checks import check_int
from gradsparse.compressors.base import Compressor, CompressorState
from gradsparse.payload import SparsePayload, index_dtype_for

__all__ = ["ScaledSign", "pack_signs", "unpack_signs"]

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _weights(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)


def pack_signs(values: torch.Tensor) -> torch.Tensor:
    """``ceil(n / 8)`` bytes: bit ``i % 8`` of byte ``i // 8`` is set when ``values[i] >= 0``
    (or is NaN: its scale says so)."""
    n = values.numel()
    bits = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=values.device)
    bits[:n] = ~(values < 0)
    return (bits.view(-1, 8) * _weights(values.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` signs (+1 or -1, of ``dtype``) from :func:`pack_signs`' bytes."""
    bits = (packed.unsqueeze(1) & _weights(packed.device)) != 0
    return bits.reshape(-1)[:numel].to(dtype).mul_(2).sub_(1)


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

    def __post_init__(self) -> None:
        check_int("block", self.block, minimum=1)

    def blocks(self, numel: int) -> int:
        """How many scales a tensor of ``numel`` entries has."""
        return (numel + self.block - 1) // self.block

    def scales(self, values: torch.Tensor) -> torch.Tensor:
        """Each block's mean magnitude (the last block's over the entries it has), as
        bfloat16."""
        n = values.numel()
        padded = torch.zeros(self.blocks(n) * self.block, dtype=values.dtype, device=values.device)
        padded[:n] = values.abs()
        sums = padded.view(-1, self.block).sum(dim=1)
        counts = torch.full_like(sums, float(self.block))
        if n % self.block:
            counts[-1] = n % self.block
        return sums.div_(counts).to(torch.bfloat16)

    def encode(self, values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(packed signs, block scales) of the flat ``values``."""
        return pack_signs(values), self.scales(values)

    def decode(
        self, signs: torch.Tensor, scales: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The ``numel`` values, of ``dtype``, that ``(signs, scales)`` stand for."""
        decoded = unpack_signs(signs, numel, dtype)
        scales = scales.to(dtype)
        whole = numel - numel % self.block
        decoded[:whole].view(-1, self.block).mul_(scales[: numel // self.block].unsqueeze(1))
        if numel % self.block:
            decoded[whole:].mul_(scales[-1])
        return decoded

    def compress(self, tensor: torch.Tensor, state: Optional[CompressorState] = None) -> SparsePayload:
        """Every entry, at its decoded value (for paths that carry (index, value) pairs;
        the sign route sends the packed form)."""
        flat = self._check_input(tensor)
        n = flat.numel()
        indices = torch.arange(n, dtype=index_dtype_for(n), device=flat.device)
        return SparsePayload(indices, self.decode(*self.encode(flat), n, dtype=flat.dtype), n)
