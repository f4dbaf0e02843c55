"""gradsparse-train end to end, as a user runs it (a subprocess starting its own ranks)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradsparse.train import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
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
    for name in ("results.csv", "summary.md", "accuracy_vs_epoch.png", "accuracy_vs_mb.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    final = {r["config"]: r for r in rows(tmp_path) if r["epoch"] == "2"}
    assert float(final["dense"]["test_accuracy"]) > 0.8  # chance is 0.1
    assert float(final["topk:0.05"]["test_accuracy"]) > 0.5
    assert float(final["topk:0.05"]["compression_ratio"]) > 5
    assert (tmp_path / "accuracy_vs_epoch.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    common = ["--compare", "topk:0.05", "--epochs", "2", "--checkpoint-every", "1000"]
    run_cli(*common, "--out", str(tmp_path / "straight"))
    run_cli("--compare", "topk:0.05", "--epochs", "1", "--checkpoint-every", "1000", "--out", str(tmp_path / "split"))
    run_cli(*common, "--resume", "--out", str(tmp_path / "split"))
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
    torch.save({"format": "gradsparse-train/1", "model_name": "mlp"}, ckpt)
    assert main(["--compare", "topk:0.01", "--model", "cnn", "--resume", "--out", str(tmp_path)]) == 2
    assert "was saved for model 'mlp', not 'cnn'" in capsys.readouterr().err


def test_a_tampered_checkpoint_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "topk_0.01-seed0.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint at all")
    assert main(["--compare", "topk:0.01", "--resume", "--out", str(tmp_path)]) == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
