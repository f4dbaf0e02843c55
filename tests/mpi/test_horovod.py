"""gradsparse.integrations.horovod under horovodrun (gloo) and mpirun, against the DDP hook."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gradsparse as gs
from tests.distributed.harness import flat_params, run_distributed
from tests.distributed.test_ddp_hook import loss_of, make_model

hvd = pytest.importorskip(
    "horovod.torch", reason="Horovod is not installed: build it for this torch with scripts/install-horovod"
)
HERE = Path(__file__).resolve().parent
STEPS = 12


def _ddp_reference(rank, world, min_numel):
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    gs.register_sparse_hook(ddp, "topk", density=0.02, scope="layer", min_compress_numel=min_numel)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(ddp, rank, step).backward()
        opt.step()
    return flat_params(model)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _launcher(kind):
    bindir = str(Path(sys.executable).parent)
    if kind == "horovodrun":
        exe = shutil.which("horovodrun", path=bindir) or shutil.which("horovodrun")
        return [exe, "--gloo", "-np", "2", "-H", "localhost:2"]
    exe = shutil.which("mpirun", path=bindir) or shutil.which("mpirun")
    return [exe, "--allow-run-as-root", "--oversubscribe", "-n", "2"]


@pytest.mark.parametrize("launcher,min_numel", [("horovodrun", 0), ("mpirun", 1024)])
def test_horovod_optimizer_matches_the_ddp_hook(launcher, min_numel, tmp_path):
    out = tmp_path / "horovod.pt"
    cmd = [*_launcher(launcher), sys.executable, str(HERE / "horovod_checks.py"), str(out), str(min_numel)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and "HOROVOD CHECKS PASSED" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    result = torch.load(out, weights_only=True)
    reference = run_distributed(_ddp_reference, 2, min_numel)[0]
    if min_numel == 0:  # every gradient sparse: the same selection and the same rank-ordered sum
        assert torch.equal(result["params"], reference)
    else:  # small gradients go through Horovod's own allreduce, which adds in its own order
        assert_close(result["params"], reference, rtol=1e-5, atol=1e-6)
    assert result["bytes_sent"] > 0
