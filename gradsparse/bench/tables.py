"""The benchmark's table and plots (written through :mod:`gradsparse.report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from gradsparse.report import Plot, markdown_table, plot_lines

__all__ = ["HEADER", "MODEL_HEADER", "plots", "table"]

HEADER = (
    "P",
    "link",
    "size",
    "method",
    "density",
    "median ms (IQR)",
    "select / comm / decode ms",
    "MB sent / recv",
    "wire MB",
    "speedup vs DDP",
    "x limit",
    "check",
)


def _mb(r: Dict[str, Any]) -> str:
    """Bytes per step of the busiest rank, sent and received."""
    received = r.get("received_per_rank")
    sent = f"{r['bytes_per_rank'] / 1e6:.2f}"
    return sent if received is None else f"{sent} / {received / 1e6:.2f}"


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
        _mb(r),
        wire,
        f"{r['speedup_vs_ddp']:.1f}x" if r.get("speedup_vs_ddp") else "-",
        f"{r['ratio_to_limit']:.2f}" if r.get("ratio_to_limit") else "-",
        f"{'ok' if r['correct'] else 'FAILED'} ({r['check']})",
    ]


MODEL_HEADER = (
    "P",
    "link",
    "model",
    "method",
    "density",
    "step ms (min-max)",
    "select / comm / decode / other ms",
    "samples/s",
    "MB sent / recv",
    "wire MB",
    "speedup vs DDP",
    "x no-comm step",
    "loss first -> last",
    "check",
)


def _model_split(r: Dict[str, Any]) -> str:
    """The hook's stage timers per step (summed over the buckets), and ``other``: the time over
    the no-communication step that select and decode do not account for (waiting on the
    wire past the backward pass, DDP's copies, Python); ``-`` without a noop row, and for
    the rows of runs made before the timers were recorded."""
    if r["method"] != "sparse" or not r.get("compress_s"):
        return "-"
    over = r.get("over_floor_s")
    other = "-" if over is None else f"{1e3 * (over - r['compress_s'] - r['decompress_s']):.0f}"
    return f"{1e3 * r['compress_s']:.0f} / {1e3 * r['communicate_s']:.0f} / {1e3 * r['decompress_s']:.0f} / {other}"


def _model_cells(r: Dict[str, Any]) -> List[str]:
    return [
        str(r["world"]),
        r.get("rate") or "loopback",
        f"{r['model']} ({r['numel'] / 1e6:.1f}M)",
        r["label"],
        f"{r['density']:g}" if r["method"] == "sparse" else "-",
        f"{1e3 * r['median_s']:.0f} ({1e3 * r['q1_s']:.0f}-{1e3 * r['q3_s']:.0f})",
        _model_split(r),
        f"{r['samples_per_s']:.1f}",
        _mb(r),
        f"{r['wire_bytes_per_rank'] / 1e6:.2f}" if r.get("wire_bytes_per_rank") else "-",
        f"{r['speedup_vs_ddp']:.2f}x" if r.get("speedup_vs_ddp") else "-",
        f"{r['x_floor']:.2f}" if r.get("x_floor") else "-",
        f"{r['first_loss']:.2f} -> {r['last_loss']:.2f}",
        f"{'ok' if r['correct'] else 'FAILED'} ({r['check']})",
    ]


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """One Markdown table for single-parameter rows, another for whole-model rows."""
    single = [r for r in rows if not r.get("model")]
    models = [r for r in rows if r.get("model")]
    parts = [markdown_table(HEADER, [_cells(r) for r in single])] if single else []
    if models:
        parts.append(markdown_table(MODEL_HEADER, [_model_cells(r) for r in models]))
    return "\n\n".join(parts)


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
    return plot_lines([r for r in rows if r["method"] == "sparse" and not r.get("model")], _PLOTS, out)
