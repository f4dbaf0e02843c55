"""What a benchmark sweep measures: one :class:`Config` per method, size and density."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASELINES", "Config"]

#: DDP's allreduce and PyTorch's own compression hooks, measured in the same run (16-bit is
#: the honest baseline to beat: Han et al. 2024)
BASELINES = ("ddp", "bf16", "fp16", "powersgd1", "powersgd4")
#: the baselines that halve the bytes by casting to a 16-bit type
HALF = ("bf16", "fp16")


@dataclass(frozen=True)
class Config:
    method: str  # a baseline, or "sparse"
    numel: int
    density: float = 1.0
    compressor: str = ""
    collective: str = ""

    @property
    def label(self) -> str:
        if self.method != "sparse":
            return self.method
        return f"{self.compressor}/{self.collective}"
