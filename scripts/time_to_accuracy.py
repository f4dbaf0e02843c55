"""Time to accuracy over a shaped link: gradsparse-train's ranks run inside the emulated
cluster (one network namespace per rank, tc tbf at --rate), dense vs sparse, and the table
reports how long each took to reach the dense run's final test accuracy.

    sudo .venv/bin/python scripts/time_to_accuracy.py --ranks 4 --rate 1gbit --epochs 10
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

from gradsparse.bench.cluster import Cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--compare", default="dense,topk:0.01")
    parser.add_argument("--collective", default="allgather", help="the sparse runs' collective (e.g. shared_topk)")
    parser.add_argument("--out", default="docs/time_to_accuracy")
    args = parser.parse_args()
    out = Path(args.out)
    cluster = Cluster(args.ranks, args.rate)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with cluster:
        procs = []
        for rank in range(args.ranks):
            env = {**os.environ, **cluster.rank_env(rank, port), "OMP_NUM_THREADS": "1"}
            cmd = [
                *cluster.exec_prefix(rank),
                sys.executable,
                "-m",
                "gradsparse.train",
                "--model",
                args.model,
                "--compare",
                args.compare,
                "--epochs",
                str(args.epochs),
                "--collective",
                args.collective,
                "--out",
                str(out),
            ]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if rank else None))
        codes = [p.wait() for p in procs]
    if any(codes):
        print(f"time_to_accuracy: ranks exited with {codes}", file=sys.stderr)
        return 1
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    dense = [r for r in rows if r["config"] == configs[0]]
    target = float(dense[-1]["test_accuracy"])
    lines = [
        f"{args.ranks} ranks over {args.rate} links, {args.model}, {args.epochs} epochs; "
        f"target = {configs[0]}'s final test accuracy, {100 * target:.2f}%",
        "",
        "| config | final accuracy | s per epoch | time to target (s) | speedup to target |",
        "|---|---|---|---|---|",
    ]
    base = None
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        reached = next((float(r["seconds"]) for r in mine if float(r["test_accuracy"]) >= target), None)
        base = reached if config == configs[0] else base
        speed = f"{base / reached:.1f}x" if reached and base else "not reached"
        per_epoch = float(mine[-1]["seconds"]) / len(mine)
        lines.append(
            f"| {config} | {100 * float(mine[-1]['test_accuracy']):.2f}% | {per_epoch:.2f} "
            f"| {reached if reached is None else round(reached, 1)} | {speed} |"
        )
    table = "\n".join(lines)
    (out / "time_to_accuracy.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
