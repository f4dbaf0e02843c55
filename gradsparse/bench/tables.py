"""The benchmark's table and plots (written through :mod:`gradsparse.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from gradsparse.report import Plot, markdown_table, plot_lines

__all__ = ["HEADER", "plots", "table"]

HEADER = (
    "P",
    "link",
    "size",
    "method",
    "density",
    "median ms (IQR)",
    "select / comm / decode ms",
    "MB per rank",
    "wire MB",
    "speedup vs DDP",
    "x limit",
    "check",
)


def _cells(r: Dict[str, Any]) -> List[str]:
    sparse = r["method"] == "sparse"
    split = f"{1e3 * r['compress_s']:.1f} / {1e3 * r['communicate_s']:.1f} / {1e3 * r['decompress_s']:.1f}"
    wire = f"{r['wire_bytes_per_rank'] / 1e6:.2f}" if r.get("wire_bytes_per_rank") else "-"
    return [
        str(r["world"]),
        (r.get("rate") or "loopback") + (f" ({r['slow']})" if r.get("slow") else ""),
        f"{r['numel'] / 1e6:g}M",
        r["label"],
        f"{r['density']:g}" if sparse else "-",
        f"{1e3 * r['median_s']:.1f} ({1e3 * r['q1_s']:.1f}-{1e3 * r['q3_s']:.1f})",
        split if sparse else "-",
        f"{r['bytes_per_rank'] / 1e6:.2f}",
        wire,
        f"{r['speedup_vs_ddp']:.1f}x" if r.get("speedup_vs_ddp") else "-",
        f"{r['ratio_to_limit']:.2f}" if r.get("ratio_to_limit") else "-",
        f"{'ok' if r['correct'] else 'FAILED'} ({r['check']})",
    ]


def table(rows: Sequence[Dict[str, Any]]) -> str:
    return markdown_table(HEADER, [_cells(r) for r in rows])


_PLOTS = (
    Plot(
        "time_vs_density", "density", "median_s", "density", "step time (s)",
        lambda r: (r["label"], r["numel"], r["world"], r.get("rate")), xlog=True, ylog=True,
    ),
    Plot(
        "bytes_vs_world", "world", "bytes_per_rank", "world", "bytes per rank",
        lambda r: (r["label"], r["numel"], r["density"], r.get("rate")), ylog=True,
    ),
    Plot(
        "speedup_vs_rate", "rate_bps", "speedup_vs_ddp", "link rate (bit/s)", "speedup over DDP allreduce",
        lambda r: (r["label"], r["numel"], r["density"], r["world"]), xlog=True, ylog=True,
    ),
)  # fmt: skip


def plots(rows: Sequence[Dict[str, Any]], out: Path) -> List[Path]:
    return plot_lines([r for r in rows if r["method"] == "sparse"], _PLOTS, out)
