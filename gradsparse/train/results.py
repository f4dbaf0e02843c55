"""The comparison's results: per-configuration summaries, the table, CSV and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

from gradsparse.report import Plot, markdown_table, plot_lines, write_csv

__all__ = ["summarise", "summary_table", "write_outputs"]


def summarise(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The last epoch of each configuration, averaged over seeds."""
    out = []
    for label in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == label]
        last_epoch = max(r["epoch"] for r in mine)
        final = [r for r in mine if r["epoch"] == last_epoch]
        accs = [r["test_accuracy"] for r in final]
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1))
        summary = {"config": label, "seeds": len(final), "test_accuracy": mean, "accuracy_std": std}
        for key in ("loss", "mb_sent", "compression_ratio", "density", "seconds"):
            summary[key] = sum(r[key] for r in final) / len(final)
        out.append(summary)
    return out


def summary_table(summary: Sequence[Dict[str, Any]]) -> str:
    header = [
        "config",
        "test accuracy (mean ± std)",
        "final loss",
        "MB sent per rank",
        "compression",
        "density",
        "wall s",
    ]
    rows = [
        [
            s["config"],
            f"{100 * s['test_accuracy']:.2f}% ± {100 * s['accuracy_std']:.2f}",
            f"{s['loss']:.4f}",
            f"{s['mb_sent']:.2f}",
            f"{s['compression_ratio']:.0f}x",
            f"{s['density']:.4f}",
            f"{s['seconds']:.1f}",
        ]
        for s in summary
    ]
    return markdown_table(header, rows)


_PLOTS = (
    Plot("accuracy_vs_epoch", "epoch", "test_accuracy_pct", "epoch", "test accuracy (%)", lambda r: r["config"]),
    Plot(
        "accuracy_vs_mb", "mb_sent", "test_accuracy_pct", "MB sent per rank", "test accuracy (%)",
        lambda r: r["config"], xlog=True,
    ),
)  # fmt: skip


def write_outputs(rows: Sequence[Dict[str, Any]], out: Path) -> Dict[str, Path]:
    """results.csv (every epoch), summary.md, and PNG plots of accuracy against epochs
    and against megabytes sent (averaged over seeds)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(rows, out / "results.csv", columns=list(rows[0])), "table": out / "summary.md"}
    paths["table"].write_text(summary_table(summarise(rows)) + "\n")
    plotted = [{**r, "test_accuracy_pct": 100 * r["test_accuracy"]} for r in rows]
    for path in plot_lines(plotted, _PLOTS, out):
        paths[path.stem] = path
    return paths
