"""Result files for the CLIs: Markdown tables, CSV and line plots.

One module for ``gradsparse-train`` and ``gradsparse-bench``: each gives rows (dicts) and
says which columns and series it wants; this module writes them.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["Plot", "markdown_table", "mean_std", "plot_lines", "write_csv"]

logger = logging.getLogger(__name__)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value) of seeds' results."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Dict[str, Any]], path: Path, columns: Optional[Sequence[str]] = None) -> Path:
    """Every row as a CSV line; the columns are ``columns`` or every key seen, sorted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(columns) if columns is not None else sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass(frozen=True)
class Plot:
    """One figure: a line per series (rows grouped by ``series``), ``x`` against ``y``."""

    name: str
    x: str
    y: str
    xlabel: str
    ylabel: str
    series: Callable[[Dict[str, Any]], Any]
    xlog: bool = False
    ylog: bool = False


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'gradsparse[train]')")
        return None
    return plt


def plot_lines(rows: Sequence[Dict[str, Any]], plots: Sequence[Plot], out: Path) -> List[Path]:
    """PNG files, one per :class:`Plot` that has a series with two or more x values; a
    series' points at the same x are averaged."""
    plt = _pyplot()
    if plt is None:
        return []
    paths = []
    for spec in plots:
        series: Dict[Any, Dict[Any, List[float]]] = {}
        for r in rows:
            if r.get(spec.x) is not None and r.get(spec.y) is not None:
                series.setdefault(spec.series(r), {}).setdefault(r[spec.x], []).append(float(r[spec.y]))
        useful = {k: v for k, v in series.items() if len(v) > 1}
        if not useful:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, points in sorted(useful.items(), key=lambda kv: str(kv[0])):
            xs = sorted(points)
            label = key if isinstance(key, str) else " ".join(map(str, key))
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", label=label)
        ax.set_xscale("log" if spec.xlog else "linear")
        ax.set_yscale("log" if spec.ylog else "linear")
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(spec.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{spec.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
