"""Write the docs site's benchmark pages from the committed results, so tables never go
stale by hand: for every ``docs/bench/NAME/results.md`` (and ``.../NAME/SUB/results.md``),
``docs/benchmarks/NAME.md`` gets the directory's ``about.md`` (what was measured, where, and
what it shows: written by whoever ran it), the command that produced the rows (rebuilt
from ``results.jsonl``), and the table itself. ``docs/benchmarks/index.md`` lists them.

    python scripts/bench_pages.py          # rewrite the pages
    python scripts/bench_pages.py --check  # exit 1 if a page differs from what it would write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
PAGES = ROOT / "docs" / "benchmarks"


def _seeds_option(rows: List[Dict[str, Any]]) -> str:
    """`` --seeds ...`` where the quality rows ran other seeds than the default (0)."""
    seeds = _joined([r.get("seed", 0) for r in rows])
    return "" if seeds == "0" else f" --seeds {seeds}"


def _joined(values: List[Any]) -> str:
    seen: List[str] = []
    for v in values:
        text = f"{v:g}" if isinstance(v, float) else str(v)
        if text and text not in seen:
            seen.append(text)
    return ",".join(seen)


def command(folder: Path) -> str:
    """The command that wrote ``folder``'s rows, from the rows themselves."""
    run = folder / "run.json"
    if run.exists():  # gradsparse-bench converge: it keeps its own command line
        return str(json.loads(run.read_text()).get("command") or "")
    jsonl = folder / "results.jsonl"
    if not jsonl.exists():
        return ""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    out = f"--out {folder.relative_to(ROOT)}"
    if rows and "table" in rows[0]:  # scripts/gpu-check (its gpu_check.py writes the rows)
        return "scripts/gpu-check"
    if rows and "profiled_ms" in rows[0]:  # scripts/profile_step.py
        return (
            f"python scripts/profile_step.py --models {_joined([r['model'] for r in rows])} "
            f"--collectives {_joined([r['collective'] for r in rows])} {out}"
        )
    if rows and "val_loss" in rows[0]:  # gradsparse-bench quality (its defaults: seed 0, chargpt, lr warm-up 0.1)
        r = rows[0]
        model = f"--model {r['model']} " if r.get("model", "chargpt") != "chargpt" else ""
        warmup = f" --lr-warmup {r['lr_warmup']:g}" if r.get("lr_warmup", 0.1) != 0.1 else ""
        return (
            f"gradsparse-bench quality {model}--optimizers {_joined([x['optimizer'] for x in rows])} "
            f"--configs {_joined([x['optimizer'] + '/' + x['config'] for x in rows])} "
            f"--steps {r['steps']} --batch {r['batch']} "
            f"--ranks {r['world']}{_seeds_option(rows)}{warmup} {out}"
        )
    sparse = [r for r in rows if r["method"] == "sparse"]
    parts = ["gradsparse-bench run", f"--world-sizes {_joined([r['world'] for r in rows])}"]
    rates = [r["rate"] for r in rows if r.get("rate")]
    parts.append(f"--rates {_joined(rates)}" if rates else "--loopback")
    models = [r["model"] for r in rows if r.get("model")]
    parts.append(f"--model {_joined(models)}" if models else f"--sizes {_joined([float(r['numel']) for r in rows])}")
    if sparse:
        parts += [
            f"--densities {_joined([r['density'] for r in sparse])}",
            f"--compressors {_joined([r['compressor'] for r in sparse])}",
            f"--collectives {_joined([r['collective'] for r in sparse])}",
        ]
    baselines = [r["method"] for r in rows if r["method"] != "sparse"]
    if baselines:
        parts.append(f"--baselines {_joined(baselines)}")
    slow = [r["slow"] for r in rows if r.get("slow")]
    if slow:
        parts.append(" ".join(f"--slow-rank {s[1:]}" for s in _joined(slow).split(",")))
    return " ".join([*parts, out])


def page(name: str, folders: List[Path]) -> str:
    about = BENCH / name / "about.md"
    text = about.read_text().strip() if about.exists() else f"# {name}"
    lines = [
        "<!-- written by scripts/bench_pages.py from docs/bench/: edit about.md there, not this page -->",
        "",
        text,
        "",
    ]
    for folder in folders:
        if len(folders) > 1:
            lines += [f"## {folder.name}", ""]
        cmd = command(folder)
        if cmd:
            lines += ["```bash", cmd, "```", ""]
        lines += [(folder / "results.md").read_text().strip(), ""]
    return "\n".join(lines)


def pages() -> Dict[Path, str]:
    groups: Dict[str, List[Path]] = {}
    for results in sorted(BENCH.rglob("results.md")):
        name = results.relative_to(BENCH).parts[0]
        groups.setdefault(name, []).append(results.parent)
    out = {PAGES / f"{name}.md": page(name, folders) for name, folders in groups.items()}
    index = ["<!-- written by scripts/bench_pages.py -->", "", "# Benchmarks", ""]
    index += [
        "Every page is generated from the committed results in `docs/bench/` by "
        "`python scripts/bench_pages.py`; each shows the command that measured it. Timings come "
        "from a noisy 2-core machine: compare rows within one page, not across pages.",
        "",
    ]
    for name in groups:
        about = BENCH / name / "about.md"
        title = about.read_text().splitlines()[0].lstrip("# ").strip() if about.exists() else name
        index.append(f"- [{title}]({name}.md)")
    out[PAGES / "index.md"] = "\n".join(index) + "\n"
    return out


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a page is stale instead of writing it")
    args = parser.parse_args(argv)
    stale = []
    for path, text in pages().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print("stale benchmark pages (run python scripts/bench_pages.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
