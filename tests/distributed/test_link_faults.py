"""A cut link on the emulated cluster: gradsparse-train on 3 ranks, each in its own network
namespace, and one rank's link taken down mid-run (its veth set down, as an unplugged
cable). Every rank must exit with one clear line within --timeout, the last checkpoint must
be intact, and after the link is restored, --resume must end bit-identical to an
uninterrupted run."""

import os
import subprocess
import sys
import time

import torch

from gradsparse.bench.cluster import Cluster
from gradsparse.train.checkpoint import load_checkpoint, load_own_state

from .test_bench import needs_root

RANKS, TIMEOUT = 3, 15.0
ARGS = ["--compressor", "topk", "--density", "0.05", "--epochs", "6", "--checkpoint-every", "5"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _start(cluster, out, phase, *extra):
    procs = []
    for rank in range(RANKS):
        env = {**_env(), **cluster.rank_env(rank, port=29611)}
        cmd = [*cluster.exec_prefix(rank), sys.executable, "-m", "gradsparse.train", *ARGS, *extra]
        cmd += ["--timeout", str(TIMEOUT), "--out", str(out)]
        log = open(out.parent / f"{phase}-rank{rank}.log", "w")  # noqa: SIM115 (closed by the caller)
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, limit):
    deadline = time.monotonic() + limit
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        finally:
            proc.kill()
            log.close()
    return codes


def _final(out):
    ckpt = load_checkpoint(out / "checkpoints" / "topk_0.05-seed0.pt", "cnn")
    return ckpt["model"], [
        load_own_state(out / "checkpoints" / "topk_0.05-seed0.pt", ckpt, r, RANKS) for r in range(RANKS)
    ]


@needs_root
def test_a_cut_link_stops_every_rank_with_one_line_and_resume_is_bit_identical(tmp_path):
    straight = tmp_path / "straight"
    proc = subprocess.run(
        [sys.executable, "-m", "gradsparse.train", "--ranks", str(RANKS), *ARGS, "--out", str(straight)],
        env=_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cut = tmp_path / "cut"
    cluster = Cluster(RANKS, "1gbit", prefix="gslink")
    with cluster:
        procs = _start(cluster, cut, "cut")
        ckpt = cut / "checkpoints" / "topk_0.05-seed0.pt"
        deadline = time.monotonic() + 300
        while not ckpt.exists() and time.monotonic() < deadline and all(p.poll() is None for p, _ in procs):
            time.sleep(0.02)
        assert ckpt.exists(), (tmp_path / "cut-rank0.log").read_text()[-3000:]
        cluster.set_link(RANKS - 1, up=False)
        cut_at = time.monotonic()
        codes = _wait(procs, TIMEOUT + 45)
        stopped = time.monotonic() - cut_at
        print(f"every rank stopped {stopped:.1f} s after the cut (--timeout {TIMEOUT:g})")
        assert all(c not in (0, None) for c in codes), codes
        assert stopped < TIMEOUT + 30, stopped  # within the collective timeout (plus start-up of the error)
        for rank in range(RANKS):
            log = (tmp_path / f"cut-rank{rank}.log").read_text()
            lines = [ln for ln in log.splitlines() if ln.startswith("gradsparse-train: error:")]
            assert len(lines) == 1 and "a peer rank died or stopped responding" in lines[0], log[-3000:]
            assert "Traceback" not in log, log[-3000:]
        _, states = _final(cut)  # the last checkpoint is intact, with every rank's own part
        assert all(s["hook"] is not None for s in states)

        cluster.set_link(RANKS - 1, up=True)
        codes = _wait(_start(cluster, cut, "resume", "--resume"), 600)
        assert codes == [0] * RANKS, [(tmp_path / f"resume-rank{r}.log").read_text()[-2000:] for r in range(RANKS)]
    a_model, a_states = _final(straight)
    b_model, b_states = _final(cut)
    for key in a_model:
        assert torch.equal(a_model[key], b_model[key]), key
    for a, b in zip(a_states, b_states):
        for name, tensor in a["hook"]["error_feedback"]["residuals"].items():
            assert torch.equal(tensor, b["hook"]["error_feedback"]["residuals"][name]), name
