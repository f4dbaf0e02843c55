"""``gradsparse-bench select``: the selection kernels alone, against torch.topk and
np.argpartition, in read+write passes over the tensor."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from gradsparse.timing import median_seconds

__all__ = ["select_bench"]


def select_bench(numel: int, density: float, out: Optional[str]) -> int:
    import numpy as np

    from gradsparse import compressors
    from gradsparse.compressors import CompressorState

    torch.set_num_threads(1)
    n = int(numel)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    k = compressors.k_for_density(density, n)
    buf = torch.empty_like(x)
    one_pass = median_seconds(lambda: torch.abs(x, out=buf))
    rows: List[Tuple[str, float, Optional[int]]] = [("one read+write pass (torch.abs out=)", one_pass, None)]
    rows.append(("torch.topk", median_seconds(lambda: torch.topk(x.abs(), k), repeats=1), k))
    rows.append(
        ("np.argpartition", median_seconds(lambda: np.argpartition(np.abs(x.numpy()), n - k)[n - k :], repeats=1), k)
    )
    for name in ("topk", "sampled_topk"):
        comp = compressors.build(name, density=density)
        state = CompressorState()
        selected = comp.compress(x, state).count
        seconds = median_seconds(functools.partial(comp.compress, x, state))
        rows.append((f"gradsparse {name}", seconds, selected))
    print(f"selection of {density:g} of {n:,} fp32 entries (k = {k:,}), one thread")
    print(f"{'method':<38}{'ms':>9}{'x pass':>9}{'vs torch.topk':>15}{'count/k':>10}")
    topk_time = rows[1][1]
    for name, seconds, count in rows:
        ratio = f"{count / k:.3f}" if count else "-"
        print(f"{name:<38}{1e3 * seconds:>9.1f}{seconds / one_pass:>9.1f}{topk_time / seconds:>14.1f}x{ratio:>10}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as fh:
            json.dump([{"method": r[0], "seconds": r[1], "count": r[2], "k": k} for r in rows], fh, indent=1)
    return 0
