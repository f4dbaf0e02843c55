"""The parent side of ``gradsparse-bench run``: start the ranks of each group (world size,
link rate) on the emulated cluster or on loopback, follow their progress, tear down, and
derive each row's speedup and ratio to the analytic limit."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gradsparse.bench.cluster import Cluster, parse_rate

from .configs import Config

__all__ = ["configs_for", "enrich", "run_group"]


def configs_for(
    sizes: Sequence[int],
    densities: Sequence[float],
    compressors: Sequence[str],
    collectives: Sequence[str],
    baselines: Sequence[str],
    models: Sequence[Tuple[str, int]] = (),
) -> List[Config]:
    """Every baseline and every sparse combination, per size, or per model when ``models``
    (name, parameter count) are given."""
    out: List[Config] = []
    targets = [(n, "") for n in sizes] if not models else [(numel, name) for name, numel in models]
    for numel, model in targets:
        out += [Config(b, numel, model=model) for b in baselines]
        for density in densities:
            for compressor in compressors:
                out += [Config("sparse", numel, density, compressor, c, model) for c in collectives]
    return out


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path) as fh:
        return sum(1 for _ in fh)


def _rank_command(cluster: Optional[Cluster], rank: int, world: int, spec_file: Path) -> Any:
    worker = [sys.executable, "-m", "gradsparse.bench.step", str(spec_file)]
    if cluster is not None:
        # inside the rank's namespace: the store and gloo see only its lo and veth
        return [*cluster.exec_prefix(rank), *worker], {**os.environ, **cluster.rank_env(rank), "OMP_NUM_THREADS": "1"}
    env = {"GLOO_SOCKET_IFNAME": "lo", "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    return worker, {**os.environ, **env, "OMP_NUM_THREADS": "1"}


def _follow(procs: List[subprocess.Popen], out: Path, total: int, desc: str) -> None:
    from tqdm import tqdm

    before = _lines(out)
    with tqdm(total=total, desc=desc, unit="cfg", disable=not sys.stderr.isatty()) as bar:
        done = 0
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            now = _lines(out) - before
            bar.update(now - done)
            done = now
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                raise RuntimeError(f"a benchmark rank exited with code {failed[0].returncode}")


def run_group(
    world: int,
    rate: Optional[str],
    configs: List[Config],
    warmup: int,
    iters: int,
    out: Path,
    slow: Tuple[Tuple[int, str], ...] = (),
) -> None:
    """All configurations at one world size and link rate, on one cluster (or loopback);
    ``slow`` gives some ranks' links a rate of their own."""
    cluster = None if rate is None else Cluster(world, rate, slow=tuple(s for s in slow if s[0] < world))
    spec: Dict[str, Any] = {"configs": [c.__dict__ for c in configs], "warmup": warmup, "iters": iters, "out": str(out)}
    procs: List[subprocess.Popen] = []
    # The ranks meet through a file, not a TCPStore (whose server listens on every
    # interface); gloo binds to lo or to the rank's veth. Nothing listens anywhere else.
    store_dir = Path(tempfile.mkdtemp(prefix="gsbench-store-"))

    def teardown(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(store_dir, ignore_errors=True)
        if cluster is not None:
            cluster.down()

    def on_term(*_: object) -> None:
        teardown()
        sys.exit(143)

    atexit.register(teardown)
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        if cluster is not None:
            cluster.up()
            spec["interface"] = cluster.interface
        spec["store_file"] = str(store_dir / "store")
        spec_file = Path(tempfile.mkstemp(prefix="gsbench-", suffix=".json")[1])
        spec_file.write_text(json.dumps(spec))
        for rank in range(world):
            cmd, env = _rank_command(cluster, rank, world, spec_file)
            procs.append(subprocess.Popen(cmd, env=env))
        _follow(procs, out, len(configs), f"P={world} {rate or 'loopback'}")
        spec_file.unlink()
    finally:
        teardown()
        signal.signal(signal.SIGTERM, previous)
        atexit.unregister(teardown)


def enrich(rows: List[Dict[str, Any]]) -> None:
    """Speedup over DDP's allreduce in the same group, the ratio to the step without any
    communication (``noop``, when measured), and the ratio to the analytic limit
    (the busiest rank's payload bytes, sent or received, at the link rate plus one memory
    pass; none for whole models)."""

    def key(r: Dict[str, Any]) -> Tuple[Any, ...]:
        return (r["numel"], r.get("model", ""), r["world"], r.get("rate"))

    for row in rows:
        base = next((r for r in rows if r["method"] == "ddp" and key(r) == key(row)), None)
        row["speedup_vs_ddp"] = base["median_s"] / row["median_s"] if base else None
        floor = next((r for r in rows if r["method"] == "noop" and key(r) == key(row)), None)
        row["x_floor"] = row["median_s"] / floor["median_s"] if floor else None
        row["over_floor_s"] = row["median_s"] - floor["median_s"] if floor else None
        bps = parse_rate(row["rate"]) if row.get("rate") else None
        row["rate_bps"] = bps
        if bps is not None and not row.get("model"):  # a whole model's step is mostly compute
            moved = max(row["bytes_per_rank"], row.get("received_per_rank") or 0)
            row["limit_s"] = moved * 8 / bps + row["pass_s"]
            row["ratio_to_limit"] = row["median_s"] / row["limit_s"]
        else:
            row["limit_s"] = row["ratio_to_limit"] = None
