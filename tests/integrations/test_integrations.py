"""Lightning, the Hugging Face Trainer and accelerate, the real packages, 2 CPU ranks each,
launched as users launch them. Each test skips with the extra to install when its package
is missing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(cmd, timeout=600):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def _torchrun(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]


PARAMETERS = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]


@pytest.mark.parametrize(
    "package,strategy,collective",
    [
        ("lightning", "ddp", "allgather"),
        ("lightning", "ddp_spawn", "allgather"),
        ("pytorch_lightning", "ddp", "allgather"),
        ("pytorch_lightning", "ddp_spawn", "allgather"),
        ("lightning", "ddp_spawn", "shared_topk"),  # the state pickled into the workers
    ],
)
def test_lightning_callback_registers_the_hook_on_cpu_and_logs_its_stats(package, strategy, collective, tmp_path):
    pytest.importorskip(package, reason=f"{package} is not installed: pip install 'gradsparse[lightning]'")
    _run([sys.executable, str(HERE / "lightning_script.py"), package, strategy, str(tmp_path), collective])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["steps"] == 8
    assert 0 < result["bytes_sent"] < result["dense_bytes"] / 5
    assert result["names"] == sorted(PARAMETERS)  # keyed by name, also in spawned workers
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = [float(r["gradsparse/bytes_sent"]) for r in rows if r.get("gradsparse/bytes_sent")]
    assert len(logged) >= 3 and logged == sorted(logged) and logged[-1] > 0  # cumulative, every 2 steps


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_transformers_trainer_in_one_line_with_find_unused_parameters(collective, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'gradsparse[transformers]'")
    out = tmp_path / "result.json"
    _run(_torchrun(HERE / "transformers_script.py", str(out), str(tmp_path / "trainer"), collective))
    result = json.loads(out.read_text())
    assert result["steps"] == 8 and 0 < result["bytes_sent"] < result["dense_bytes"] / 5
    assert result["history"] >= 3 and result["seen"] >= 3  # in the Trainer's logs and what report_to sees
    assert result["names"] == sorted(PARAMETERS)
    assert result["idle_residual"] == 0.0  # the parameter no forward uses never gets a residual


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_accelerate_prepared_model_with_gradient_accumulation(collective, tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install 'gradsparse[accelerate]'")
    out = tmp_path / "result.json"
    _run(_torchrun(HERE / "accelerate_script.py", str(out), collective))
    result = json.loads(out.read_text())
    assert result["distributed"].endswith("MULTI_CPU")
    assert result["batches"] == 16
    assert result["steps"] == result["batches"] // 2  # the hook runs on the synchronising steps only
    assert 0 < result["bytes_sent"] < result["dense_bytes"] / 5
