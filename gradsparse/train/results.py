"""The comparison's results: per-configuration summaries, the table, CSV and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

from gradsparse.report import Plot, markdown_table, mean_std, plot_lines, write_csv

__all__ = ["METRIC_LABELS", "summarise", "summary_table", "write_outputs"]

#: a task's metric -> (its label in tables and plots, the factor it is shown with)
METRIC_LABELS = {"test_accuracy": ("test accuracy (%)", 100.0), "val_loss": ("validation loss (nats)", 1.0)}


def summarise(rows: Sequence[Dict[str, Any]], metric: str = "test_accuracy") -> List[Dict[str, Any]]:
    """The last record of each configuration and seed, averaged over seeds: ``metric``'s
    mean and standard deviation (``metric_std``)."""
    out = []
    for label in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == label]
        last = max(r["step"] for r in mine)
        final = [r for r in mine if r["step"] == last]
        values = [r[metric] for r in final]
        mean, std = mean_std(values)
        summary = {"config": label, "seeds": len(final), metric: mean, "metric_std": std}
        for key in ("loss", "mb_sent", "compression_ratio", "density", "seconds"):
            summary[key] = sum(r[key] for r in final) / len(final)
        out.append(summary)
    return out


def summary_table(summary: Sequence[Dict[str, Any]], metric: str = "test_accuracy") -> str:
    name, scale = METRIC_LABELS[metric]
    unit = "%" if scale == 100.0 else ""
    header = [f"{name} (mean ± std)", "final train loss", "MB sent per rank", "compression", "density", "wall s"]
    rows = [
        [
            s["config"],
            f"{scale * s[metric]:.{2 if unit else 3}f}{unit} ± {scale * s['metric_std']:.{2 if unit else 3}f}",
            f"{s['loss']:.4f}",
            f"{s['mb_sent']:.2f}",
            f"{s['compression_ratio']:.0f}x",
            f"{s['density']:.4f}",
            f"{s['seconds']:.1f}",
        ]
        for s in summary
    ]
    return markdown_table(["config", *header], rows)


def _plots(metric: str) -> List[Plot]:
    label, name = METRIC_LABELS[metric][0], metric.replace("test_", "")
    return [
        Plot(f"{name}_vs_step", "step", "metric_shown", "step", label, lambda r: r["config"]),
        Plot(f"{name}_vs_mb", "mb_sent", "metric_shown", "MB sent per rank", label, lambda r: r["config"], xlog=True),
    ]


def write_outputs(rows: Sequence[Dict[str, Any]], out: Path, metric: str = "test_accuracy") -> Dict[str, Path]:
    """results.csv (every evaluation), summary.md, and PNG plots of the metric against
    steps and against megabytes sent (averaged over seeds)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(rows, out / "results.csv", columns=list(rows[0])), "table": out / "summary.md"}
    paths["table"].write_text(summary_table(summarise(rows, metric), metric) + "\n")
    scale = METRIC_LABELS[metric][1]
    plotted = [{**r, "metric_shown": scale * r[metric]} for r in rows]
    for path in plot_lines(plotted, _plots(metric), out):
        paths[path.stem] = path
    return paths
