"""gradsparse-train end to end, as a user runs it (a subprocess starting its own ranks)."""

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradsparse.train import UsageError, main
from gradsparse.train.checkpoint import CHECKPOINT_FORMAT, load_own_state, rank_file
from gradsparse.train.launcher import peer_failure

from .harness import descendants, watch_sockets


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = _env()
    cmd = [sys.executable, "-m", "gradsparse.train", "--ranks", "2", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def rows(out: Path):
    with open(out / "results.csv") as fh:
        return list(csv.DictReader(fh))


def test_compare_trains_and_writes_table_and_plots(tmp_path):
    proc = run_cli("--compare", "dense,topk:0.05", "--epochs", "2", "--out", str(tmp_path))
    assert "| dense |" in proc.stdout and "| topk:0.05 |" in proc.stdout
    for name in ("results.csv", "summary.md", "accuracy_vs_step.png", "accuracy_vs_mb.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    final = {r["config"]: r for r in rows(tmp_path) if r["epoch"] == "2"}
    assert float(final["dense"]["test_accuracy"]) > 0.8  # chance is 0.1
    assert float(final["topk:0.05"]["test_accuracy"]) > 0.5
    assert float(final["topk:0.05"]["compression_ratio"]) > 5
    assert (tmp_path / "accuracy_vs_step.png").read_bytes()[:4] == b"\x89PNG"


def test_chargpt_with_sparse_adamw_against_the_baselines_records_every_evaluation(tmp_path):
    configs = "dense,powersgd:1,sign,quantize:2,topk:0.01+signs=3"
    proc = run_cli("--model", "chargpt", "--optimizer", "sparse_adamw", "--compare", configs, "--max-steps", "6",
                   "--eval-every", "3", "--batch-size", "4", "--out", str(tmp_path))  # fmt: skip
    assert "chargpt on King James text (characters), sparse_adamw, 2 ranks, 6 steps" in proc.stdout
    assert "validation loss (nats) (mean ± std)" in proc.stdout
    table = rows(tmp_path)
    assert [(r["config"], r["step"]) for r in table] == [(c, s) for c in configs.split(",") for s in ("3", "6")]
    last = {r["config"]: r for r in table if r["step"] == "6"}
    assert all(math.isfinite(float(r["val_loss"])) and float(r["perplexity"]) > 1 for r in table)
    dense = float(last["dense"]["mb_sent"])
    assert float(last["powersgd:1"]["mb_sent"]) < dense / 10  # one bucket: no gloo hang either
    assert float(last["sign"]["mb_sent"]) < dense / 20
    two_bits = float(last["quantize:2"]["mb_sent"]) / float(last["sign"]["mb_sent"])
    assert 1.5 < two_bits < 2  # 2 bits per entry, not 1 (the small parameters go dense in both)
    # +signs=3: SparseAdamW's warm-up sends exactly 3 steps as signs, the sign row's bytes, then top-k's
    mid = {r["config"]: float(r["mb_sent"]) for r in table if r["step"] == "3"}
    assert math.isclose(mid["topk:0.01+signs=3"], mid["sign"], rel_tol=1e-6)
    after = float(last["topk:0.01+signs=3"]["mb_sent"]) - mid["topk:0.01+signs=3"]
    assert 0 < after < (float(last["sign"]["mb_sent"]) - mid["sign"]) / 1.3
    assert float(last["dense"]["seconds"]) > float(next(r for r in table if r["config"] == "dense")["seconds"])
    assert (tmp_path / "val_loss_vs_step.png").read_bytes()[:4] == b"\x89PNG"


def test_mnist_cnn_against_bf16_evaluates_every_n_steps_and_at_the_epoch_end(tmp_path):
    configs = "dense,bf16,topk:0.01@shared_topk"
    run_cli("--model", "mnist_cnn", "--compare", configs, "--epochs", "1", "--eval-every", "25",
            "--out", str(tmp_path))  # fmt: skip
    table = rows(tmp_path)
    assert [r["step"] for r in table if r["config"] == "dense"] == ["25", "50", "63"]  # 4,000 images, 2 x 32
    final = {r["config"]: r for r in table if r["step"] == "63"}
    assert float(final["dense"]["test_accuracy"]) > 0.8, final  # chance is 0.1
    assert float(final["bf16"]["test_accuracy"]) > 0.8 and float(final["topk:0.01@shared_topk"]["test_accuracy"]) > 0.5
    dense = float(final["dense"]["mb_sent"])
    assert float(final["bf16"]["mb_sent"]) == pytest.approx(dense / 2, rel=1e-6)
    assert float(final["topk:0.01@shared_topk"]["density"]) == pytest.approx(0.01, rel=0.2)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    common = ["--compare", "topk:0.05", "--epochs", "2", "--checkpoint-every", "1000"]
    run_cli(*common, "--out", str(tmp_path / "straight"))
    run_cli("--compare", "topk:0.05", "--epochs", "1", "--checkpoint-every", "1000", "--out", str(tmp_path / "split"))
    resumed = run_cli(*common, "--resume", "--out", str(tmp_path / "split"))
    assert "at epoch 1, step 0: written by 2 ranks, now 2; hook state as saved" in resumed.stdout, resumed.stdout
    ckpt = "checkpoints/topk_0.05-seed0.pt"
    a = torch.load(tmp_path / "straight" / ckpt, weights_only=True)
    b = torch.load(tmp_path / "split" / ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name, tensor in a["hook"]["error_feedback"]["residuals"].items():
        assert torch.equal(tensor, b["hook"]["error_feedback"]["residuals"][name]), name
    ra, rb = rows(tmp_path / "straight"), rows(tmp_path / "split")
    assert [(r["test_accuracy"], r["loss"], r["mb_sent"]) for r in ra] == [
        (r["test_accuracy"], r["loss"], r["mb_sent"]) for r in rb
    ]


def _final_state(out: Path):
    ckpt = torch.load(out / "checkpoints" / "topk_0.05-seed0.pt", weights_only=True)
    files = sorted((out / "checkpoints").glob("topk_0.05-seed0.rank*.pt"))
    return ckpt, [torch.load(f, weights_only=True)["hook"] for f in files]


@pytest.mark.parametrize(
    "ranks,extra",
    # 39 steps: --dense-steps 2, so that the resumed steps are top-k (SparseAdamW's default
    # warm-up would send them all dense; its resumption is in tests/unit/test_optim.py)
    [(2, ["--optimizer", "sparse_adamw", "--schedule", "onecycle", "--eval-every", "5", "--dense-steps", "2"])],
    ids=["sparse_adamw-onecycle-eval5"],  # the most state to restore (SGD at 3 ranks: dropped for CI time)
)
def test_a_rank_killed_by_sigkill_is_restarted_and_the_run_ends_as_an_uninterrupted_one(tmp_path, ranks, extra):
    """--max-restarts: the elastic agent restarts the ranks, they resume from the last
    checkpoint (weights, optimizer, per-rank residuals and moments, step, the schedule's
    position, the loss since the last evaluation) and end bit-identical."""
    common = ["--ranks", str(ranks), "--compare", "topk:0.05", "--epochs", "3", "--checkpoint-every", "4", *extra]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = [sys.executable, "-m", "gradsparse.train", *common, "--verbose"]
    done = subprocess.run(
        [*cmd, "--out", str(straight)], env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        [*cmd, "--max-restarts", "1", "--out", str(killed)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = killed / "checkpoints" / "topk_0.05-seed0.pt"
        deadline = time.monotonic() + 300
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        victims = descendants(proc.pid, b"spawn_main", children_only=True)  # the ranks the elastic launcher spawned
        assert len(victims) == ranks, victims
        os.kill(victims[-1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-5000:]
    # the agent saw a rank fail: the victim (-9), or a survivor that lost it first (exit code 1)
    assert "failed (exitcode: " in out, out[-5000:]
    resumed = re.findall(r"resumed topk:0.05 \(seed 0\) at epoch (\d+), step (\d+)", out)
    assert len(resumed) == ranks, out[-5000:]  # every rank of the restarted group resumed
    assert all((int(e), int(s)) < (3, 0) for e, s in resumed)  # from the middle of the run

    a, a_ranks = _final_state(straight)
    b, b_ranks = _final_state(killed)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 0)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert len(a_ranks) == len(b_ranks) == ranks - 1  # old per-rank files were cleaned up
    for hook_a, hook_b in zip([a["hook"], *a_ranks], [b["hook"], *b_ranks]):
        for name, tensor in hook_a["error_feedback"]["residuals"].items():
            assert torch.equal(tensor, hook_b["error_feedback"]["residuals"][name]), name
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    keep = ("epoch", "step", "test_accuracy", "loss", "mb_sent")
    assert [[r[k] for k in keep] for r in rows(straight)] == [[r[k] for k in keep] for r in rows(killed)]


def _two_agents(tmp_path, nodes, torchrun, train, env=None):
    """Two torchrun agents ("nodes"), one rank each, c10d rendezvous on loopback, training
    into tmp_path/out; their output goes to tmp_path/node{N}.log. ``nodes(node)`` gives the
    node options; node 0 starts first and hosts the rendezvous store."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    agents, logs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 (closed by _stop)
        logs.append(log)
        cmd = [sys.executable, "-m", "torch.distributed.run", *nodes(node), "--nproc-per-node", "1"]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *torchrun]
        cmd += ["-m", "gradsparse.train", *train, "--out", str(tmp_path / "out")]
        agents.append(subprocess.Popen(cmd, env=env or _env(), stdout=log, stderr=subprocess.STDOUT))
        time.sleep(1.0 if node == 0 else 0.0)
    return agents, logs


def _first_checkpoint(tmp_path, agents):
    ckpt = tmp_path / "out" / "checkpoints" / "topk-seed0.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and time.monotonic() < deadline and all(a.poll() is None for a in agents):
        time.sleep(0.02)
    assert ckpt.exists(), (tmp_path / "node0.log").read_text()[-3000:]


def _stop(agents, logs):
    for agent in agents:
        agent.kill()
    for log in logs:
        log.close()


def test_under_torchrun_a_peer_killed_by_sigkill_makes_the_survivor_fail_fast_with_one_clear_line(tmp_path):
    """Two torchrun agents (two "nodes", one rank each, c10d rendezvous on loopback): SIGKILL the
    rank of one; the other is in a collective with a dead peer and must fail well within the
    collective timeout, saying what happened, instead of hanging."""
    timeout = 60.0
    agents, logs = _two_agents(
        tmp_path,
        lambda node: ["--nnodes", "2", "--node-rank", str(node)],
        ["--rdzv-id", "sigkill-test"],
        ["--epochs", "50", "--checkpoint-every", "2", "--timeout", str(timeout)],
    )
    try:
        _first_checkpoint(tmp_path, agents)
        (victim,) = descendants(agents[1].pid, b"gradsparse.train", children_only=True)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = agents[0].wait(timeout=2 * timeout)
        detected = time.monotonic() - killed_at
        agents[1].wait(timeout=60)
    finally:
        _stop(agents, logs)
    out = (tmp_path / "node0.log").read_text()
    assert survivor != 0
    assert detected < timeout / 4, detected  # a dead peer is seen at once, not at the timeout
    assert "gradsparse-train: error: rank 0: a peer rank died or stopped responding" in out, out[-3000:]
    assert "[rank0]: Traceback" not in out  # one line from the rank, not a stack


@pytest.mark.parametrize(
    "message,expected",
    [
        (
            "Got the following error when running the callback: RuntimeError: [/x/gloo/pair.cc:537] Read error "
            "[127.0.0.1]:18076: Connection reset by peer. This is typically caused by a remote worker hanging",
            "(Read error [127.0.0.1]:18076: Connection reset by peer)",
        ),
        ("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv operation", "Timed out"),
        ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", None),
    ],
)
def test_peer_failures_are_told_apart_from_other_errors(message, expected):
    reason = peer_failure(RuntimeError(message))
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason and ".cc:" not in reason, reason


def test_a_crash_between_per_rank_files_and_the_commit_resumes_the_previous_checkpoint(tmp_path):
    main_file = tmp_path / "cfg-seed0.pt"
    ckpt = {"world_size": 2, "epoch": 1, "step": 0, "hook": {"who": "rank0"}}
    torch.save({"hook": {"who": "old"}, "epoch": 1, "step": 0}, rank_file(main_file, 1, 1, 0))
    # rank 1 already wrote the next position when the job died; the main file still names (1, 0)
    torch.save({"hook": {"who": "new"}, "epoch": 1, "step": 4}, rank_file(main_file, 1, 1, 4))
    assert load_own_state(main_file, ckpt, 1, 2)["hook"] == {"who": "old"}
    assert load_own_state(main_file, ckpt, 0, 2)["hook"] == {"who": "rank0"}
    with pytest.raises(UsageError, match=r"cannot reshard checkpoint .* from 2 to 3 ranks"):
        load_own_state(main_file, ckpt, 1, 3)  # these hook states are not real ones
    rank_file(main_file, 1, 1, 0).unlink()
    with pytest.raises(UsageError, match="is missing"):
        load_own_state(main_file, ckpt, 1, 2)
    torch.save({"hook": {}, "epoch": 0, "step": 8}, rank_file(main_file, 1, 1, 0))  # renamed by hand
    with pytest.raises(UsageError, match="does not belong to checkpoint"):
        load_own_state(main_file, ckpt, 1, 2)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--compressor", "topkk"], "unknown compressor 'topkk'"),
        (["--compressor", "topk", "--density", "1.5"], "`density` to be a float in (0, 1], but got 1.5"),
        (["--compare", "dense,threshold:-1"], "`threshold` to be a non-negative"),
        (["--compare", "topk:0.01+ef"], "unknown flag '+ef'"),
        (["--ranks", "5000"], "--ranks 5000 is more than the 1438 training samples"),
        (["--out", "/proc/gradsparse-cannot-write"], "cannot write to the output directory"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_resuming_a_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "topk_0.01-seed0.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "model_name": "mlp"}, ckpt)
    assert main(["--compare", "topk:0.01", "--model", "cnn", "--resume", "--out", str(tmp_path)]) == 2
    assert "was saved for model 'mlp', not 'cnn'" in capsys.readouterr().err


def test_a_tampered_checkpoint_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "topk_0.01-seed0.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint at all")
    assert main(["--compare", "topk:0.01", "--resume", "--out", str(tmp_path)]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err


def _run_train(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gradsparse.train", "--out", str(out), *args]
    merged = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    return subprocess.run(cmd, check=False, env=_env(), text=True, timeout=600, **merged)


def _final_accuracy(out: Path):
    table = rows(out)
    last = max(int(r["epoch"]) for r in table)
    return float(next(r for r in table if int(r["epoch"]) == last)["test_accuracy"]), last


@pytest.mark.parametrize("before,after", [(2, 3)])  # fewer ranks: the elastic test's node that leaves
def test_resume_on_another_number_of_ranks_reshards_and_trains_to_the_same_band(tmp_path, before, after):
    common = ["--compressor", "topk", "--density", "0.05", "--checkpoint-every", "7", "--verbose"]
    first = _run_train(tmp_path / "a", "--ranks", str(before), "--epochs", "2", *common)
    assert first.returncode == 0, first.stdout[-3000:]
    resumed = _run_train(tmp_path / "a", "--ranks", str(after), "--epochs", "4", "--resume", *common)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"was written by {before} ranks: resharded for {after}" in resumed.stdout, resumed.stdout[-3000:]
    assert re.search(r"resumed topk:0.05 \(seed 0\) at epoch 2, step 0", resumed.stdout)
    line = f"written by {before} ranks, now {after}; hook state resharded"  # printed, --verbose or not
    assert len(re.findall(rf"gradsparse-train: resumed topk:0.05 \(seed 0\) from .* {line}", resumed.stdout)) == 1
    straight = _run_train(tmp_path / "b", "--ranks", str(before), "--epochs", "4", *common)
    assert straight.returncode == 0, straight.stdout[-3000:]
    (acc_resumed, last_resumed), (acc_straight, last_straight) = map(_final_accuracy, (tmp_path / "a", tmp_path / "b"))
    assert last_resumed == last_straight == 4
    assert acc_resumed > 0.85 and abs(acc_resumed - acc_straight) < 0.05, (acc_resumed, acc_straight)


def test_the_local_launcher_listens_only_on_loopback(tmp_path):
    """``--ranks N``: the rendezvous and the ranks' process group meet through files, gloo
    binds to lo; every TCP socket of the launcher and its ranks is on loopback."""
    cmd = [sys.executable, "-m", "gradsparse.train", "--ranks", "2", "--epochs", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {}
    try:
        watch_sockets(proc, seen)
        out = proc.stdout.read()
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert seen, "no TCP socket of the ranks was observed"
    assert set(seen.values()) <= {"127.0.0.1", "::1"}, seen


def test_under_torchrun_elastic_a_node_that_leaves_is_resumed_without(tmp_path):
    """torchrun --nnodes 1:2, two agents ("nodes"), one rank each: the second node dies whole
    after the first checkpoint. The survivor's rank fails with one line, its agent restarts
    the group with the one node left, and that rank resumes the 2-rank checkpoint on 1 rank:
    the hook state is resharded, and training finishes."""
    agents, logs = _two_agents(
        tmp_path,
        lambda node: ["--nnodes", "1:2"],
        ["--rdzv-id", "leave-test", "--rdzv-conf", "last_call_timeout=1", "--max-restarts", "1"],
        ["--epochs", "40", "--checkpoint-every", "4", "--verbose", "--timeout", "30"],
        env=dict(_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
    )
    try:
        _first_checkpoint(tmp_path, agents)
        node = [agents[1].pid, *descendants(agents[1].pid)]  # the whole node: its agent and its rank
        for pid in node:  # (torch elastic starts each rank in a process group of its own)
            os.kill(pid, signal.SIGKILL)
        survivor = agents[0].wait(timeout=300)
    finally:
        _stop(agents, logs)
    out = (tmp_path / "node0.log").read_text()
    assert survivor == 0, out[-5000:]
    assert "a peer rank died or stopped responding" in out, out[-5000:]
    assert "was written by 2 ranks: resharded for 1" in out, out[-5000:]
    assert re.search(r"resumed topk \(seed 0\) at epoch \d+, step \d+", out), out[-5000:]
    table = rows(tmp_path / "out")
    assert max(int(r["epoch"]) for r in table) == 40
