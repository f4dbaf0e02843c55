"""gradsparse-bench as a user runs it without root (--loopback), and what it listens on."""

import csv
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, Set

import pytest

from gradsparse.bench.cluster import NETWORK

from .harness import descendants, local_addresses, socket_inodes, watch_sockets


def test_loopback_run_checks_results_writes_every_output_and_listens_only_on_loopback(tmp_path):
    cmd = [sys.executable, "-m", "gradsparse.bench", "run", "--loopback", "--world-sizes", "2"]
    cmd += ["--sizes", "2e5", "--densities", "0.01,0.1", "--collectives", "allgather,oktopk,shared_topk,auto"]
    cmd += ["--baselines", "ddp,bf16,fp16", "--warmup", "1", "--iters", "2", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: Dict[str, str] = {}
    try:
        while proc.poll() is None:
            inodes = set().union(*(socket_inodes(p) for p in [proc.pid, *descendants(proc.pid)]))
            addresses = local_addresses()
            seen.update({i: addresses[i] for i in inodes if i in addresses})
            time.sleep(0.05)
        out = proc.stdout.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert seen, "no TCP socket of the benchmark ranks was observed"
    assert set(seen.values()) <= {"127.0.0.1", "::1"}, seen

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} >= {"ddp", "bf16", "fp16"}
    assert len(rows) == 3 + 2 * 4
    assert all(r["correct"] for r in rows), [(r["label"], r["check"]) for r in rows if not r["correct"]]
    assert all(r["median_s"] > 0 and r["bytes_per_rank"] > 0 for r in rows)
    sparse = [r for r in rows if r["method"] == "sparse"]
    ddp = next(r for r in rows if r["method"] == "ddp")
    at_1pct = [r for r in sparse if r["density"] == 0.01 and r["collective"] != "auto"]
    assert at_1pct and all(r["bytes_per_rank"] < ddp["bytes_per_rank"] / 5 for r in at_1pct)
    for name in ("results.csv", "results.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "time_vs_density.png").read_bytes()[:4] == b"\x89PNG"


def test_model_run_times_whole_training_steps(tmp_path):
    cmd = [sys.executable, "-m", "gradsparse.bench", "run", "--loopback", "--world-sizes", "2"]
    cmd += ["--model", "resnet,gpt2", "--densities", "0.01", "--compressors", "topk"]
    cmd += ["--collectives", "allgather,shared_topk", "--baselines", "noop,ddp,powersgd1"]
    cmd += ["--warmup", "1", "--iters", "1", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    run_env = dict(env, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(r["model"], r["label"]) for r in rows} == {
        (m, label)
        for m in ("resnet", "gpt2")
        for label in ("noop", "ddp", "powersgd1", "topk/allgather", "topk/shared_topk")
    }
    for model, params in (("resnet", 21_282_122), ("gpt2", 33_641_472)):
        mine = {r["label"]: r for r in rows if r["model"] == model}
        assert all(r["numel"] == params and r["samples_per_s"] > 0 for r in mine.values())
        assert all(r["correct"] for r in mine.values()), [(r["label"], r["check"]) for r in mine.values()]
        assert mine["ddp"]["bytes_per_rank"] == 2 * (2 - 1) * 4 * params // 2  # the ring formula
        assert mine["noop"]["bytes_per_rank"] == 0 and mine["noop"]["x_floor"] == 1.0
        for label in ("topk/allgather", "topk/shared_topk"):  # counted by the hook, 1% plus small tensors
            row = mine[label]
            assert 0 < row["bytes_per_rank"] < mine["ddp"]["bytes_per_rank"] / 20
            # the hook's own stage timers, per step: each ran, and select and decode fit in the step
            assert all(row[key] > 0 for key in ("compress_s", "communicate_s", "decompress_s")), row
            assert row["compress_s"] + row["decompress_s"] < row["median_s"]
            assert row["over_floor_s"] == row["median_s"] - mine["noop"]["median_s"]
        assert mine["ddp"]["compress_s"] == 0  # no hook: no stage timers
    table = (tmp_path / "results.md").read_text()
    assert "samples/s" in table and "select / comm / decode / other ms" in table


def _can_build_namespaces() -> bool:
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["ip", "netns", "add", "gsbprobe"], check=False, capture_output=True)
    subprocess.run(["ip", "netns", "del", "gsbprobe"], check=False, capture_output=True)
    return probe.returncode == 0


def _namespaces() -> Set[str]:
    listing = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.startswith("gsb")}


needs_root = pytest.mark.skipif(not _can_build_namespaces(), reason="needs root and network namespaces")


@needs_root
def test_shaped_cluster_run_binds_inside_its_namespaces_and_tears_them_down(tmp_path):
    assert not _namespaces(), "a gsb* namespace already exists; run gradsparse-bench cluster down"
    cmd = [sys.executable, "-m", "gradsparse.bench", "run", "--world-sizes", "2", "--rates", "1gbit"]
    cmd += ["--sizes", "2e5", "--densities", "0.01", "--collectives", "allgather", "--baselines", "ddp"]
    cmd += ["--warmup", "1", "--iters", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: Dict[str, str] = {}
    try:
        watch_sockets(proc, seen)
        out = proc.stdout.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert seen, "no TCP socket of the benchmark ranks was observed"
    ours = {ipaddress.ip_address(a) for a in seen.values()}
    assert all(a in NETWORK or a.is_loopback for a in ours), seen
    assert any(a in NETWORK for a in ours)  # the ranks talked over their shaped veths
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["correct"] for r in rows) and {r["rate"] for r in rows} == {"1gbit"}
    assert not _namespaces(), "namespaces left behind"


@needs_root
def test_ctrl_c_in_the_middle_of_a_cluster_run_still_tears_everything_down(tmp_path):
    assert not _namespaces()
    cmd = [sys.executable, "-m", "gradsparse.bench", "run", "--world-sizes", "2", "--rates", "100mbit"]
    cmd += ["--sizes", "4e6", "--densities", "0.1", "--collectives", "allgather", "--baselines", "ddp"]
    cmd += ["--warmup", "1", "--iters", "50", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_namespaces()) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(_namespaces()) == 3  # two ranks and the bridge
        time.sleep(1.0)  # the ranks are running
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not _namespaces(), "namespaces left behind after Ctrl-C"
    assert not descendants(proc.pid)


def test_converge_on_loopback_reports_time_to_quality_and_the_derived_link(tmp_path):
    cmd = [sys.executable, "-m", "gradsparse.bench", "converge", "--loopback", "--model", "cnn", "--ranks", "2"]
    cmd += ["--methods", "dense,bf16,topk:0.05", "--seeds", "0,1", "--steps", "24", "--eval-every", "12"]
    cmd += ["--batch-size", "8", "--calibration-steps", "6", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a100-25gbe: GPT-2 small (124M parameters)" in proc.stdout
    assert re.search(r"ratio 4\.9 needs a link of [\d.]+ Mbit/s \(--loopback: no link emulated\)", proc.stdout)
    table = (tmp_path / "results.md").read_text()
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert set(lines) >= {"dense", "bf16", "topk:0.05"}
    assert re.search(r"\| dense \| [\d.]+ ± [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ s \| - \|", lines["dense"])
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["command"].startswith("gradsparse-bench converge --loopback --model cnn")
    assert meta["rate"] is None and meta["compute_s"] > 0 and meta["setting_ratio"] == pytest.approx(4.9, abs=0.05)
    with open(tmp_path / "train" / "results.csv") as fh:
        seeds = {(r["config"], r["seed"], r["step"]) for r in csv.DictReader(fh)}
    assert len(seeds) == 3 * 2 * 2  # methods x seeds x evaluations
    assert (tmp_path / "quality_vs_seconds.png").read_bytes()[:4] == b"\x89PNG"
