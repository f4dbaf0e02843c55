"""What a benchmark sweep measures: one :class:`Config` per method, size and density."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BASELINES", "Config"]

#: DDP's allreduce and PyTorch's own compression hooks, measured in the same run (16-bit is
#: the honest baseline to beat: Han et al. 2024)
BASELINES = ("ddp", "bf16", "fp16", "powersgd1", "powersgd4", "noop")
#: PyTorch's ``noop_hook``: no communication at all, the floor a step cannot go below
#: (headroom analysis); its gradients are each rank's own, so it trains nothing together


@dataclass(frozen=True)
class Config:
    method: str  # a baseline, or "sparse"
    numel: int
    density: float = 1.0
    compressor: str = ""
    collective: str = ""
    model: str = ""  # gradsparse.bench.models.MODELS: whole training steps of that model

    @property
    def label(self) -> str:
        if self.method != "sparse":
            return self.method
        return f"{self.compressor}/{self.collective}"
