"""The hook's cumulative statistics on this rank."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Mapping

__all__ = ["HookStats"]


@dataclass
class HookStats:
    """Counters the hook adds to; :meth:`summary` derives the ratios."""

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    control_bytes: int = 0
    messages: int = 0
    dense_bytes: int = 0  # what DDP's allreduce would have sent
    selected: int = 0
    compressible: int = 0
    nonfinite_buckets: int = 0
    compress_s: float = 0.0
    communicate_s: float = 0.0
    decompress_s: float = 0.0

    def add_traffic(self, before: Mapping[str, int], after: Mapping[str, int], dense_bytes: int) -> None:
        """Add what the backend counted between two snapshots of its ``stats.as_dict()``."""
        for key in ("bytes_sent", "bytes_received", "control_bytes", "messages"):
            setattr(self, key, getattr(self, key) + after[key] - before[key])
        self.dense_bytes += dense_bytes

    def summary(self, residual_norm: float) -> Dict[str, float]:
        out: Dict[str, float] = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("selected", "compressible")
        }
        out["compression_ratio"] = (self.dense_bytes / self.bytes_sent) if self.bytes_sent else math.inf
        out["density"] = (self.selected / self.compressible) if self.compressible else 1.0
        out["residual_norm"] = residual_norm
        return out

    def log_line(self) -> str:
        s = self.summary(0.0)
        return (
            f"step {self.steps}: sent {self.bytes_sent / 1e6:.3g} MB (dense {self.dense_bytes / 1e6:.3g} MB, "
            f"ratio {s['compression_ratio']:.1f}x), density {s['density']:.4g}, compress {self.compress_s:.2f}s, "
            f"communicate {self.communicate_s:.2f}s, decompress {self.decompress_s:.2f}s"
        )

    def state_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)
