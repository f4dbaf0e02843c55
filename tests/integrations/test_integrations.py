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
import torch

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
    "package,strategy,collective,optimizer",
    [
        ("lightning", "ddp_spawn", "allgather", "sparse_adamw"),  # SparseAdamW built in the workers
        ("pytorch_lightning", "ddp", "allgather", "sparse_adamw"),
        ("lightning", "ddp_spawn", "shared_topk", "sgd"),  # the state pickled into the workers
    ],
)
def test_lightning_callback_registers_the_hook_on_cpu_and_logs_its_stats(
    package, strategy, collective, optimizer, tmp_path
):
    pytest.importorskip(package, reason=f"{package} is not installed: pip install 'gradsparse[lightning]'")
    _run([sys.executable, str(HERE / "lightning_script.py"), package, strategy, str(tmp_path), collective, optimizer])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["steps"] == 8
    assert 0 < result["bytes_sent"] < result["dense_bytes"] / 5
    assert result["names"] == sorted(PARAMETERS)  # keyed by name, also in spawned workers
    if optimizer == "sparse_adamw":  # attached by the callback: Adam's moments taken in the hook at every step
        assert result["moment_steps"] == [8]
        assert result["first_moments"] == [p for p in sorted(PARAMETERS) if p.endswith("weight")]
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = [float(r["gradsparse/bytes_sent"]) for r in rows if r.get("gradsparse/bytes_sent")]
    assert len(logged) >= 3 and logged == sorted(logged) and logged[-1] > 0  # cumulative, every 2 steps


@pytest.mark.parametrize(
    "collective,optimizer", [("allgather", "adamw"), ("shared_topk", "adamw"), ("allgather", "sparse_adamw")]
)
def test_transformers_trainer_in_one_line_with_find_unused_parameters(collective, optimizer, tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'gradsparse[transformers]'")
    out = tmp_path / "result.json"
    _run(_torchrun(HERE / "transformers_script.py", str(out), str(tmp_path / "trainer"), collective, optimizer))
    result = json.loads(out.read_text())
    if optimizer == "sparse_adamw":  # built by the Trainer from its arguments, in the same one line
        assert result["optimizer"] == "SparseAdamW" and result["moment_steps"] == [8]
        assert result["decayed"] == [p for p in [*PARAMETERS, "unused.weight"] if p.endswith("weight")]
    else:
        assert result["optimizer"] == "AdamW"
    assert result["steps"] == 8 and 0 < result["bytes_sent"] < result["dense_bytes"] / 5
    assert result["history"] >= 3 and result["seen"] >= 3  # in the Trainer's logs and what report_to sees
    assert result["names"] == sorted(PARAMETERS)
    assert result["idle_residual"] == 0.0  # the parameter no forward uses never gets a residual


def test_transformers_trainer_warm_up_of_sparse_adamw_with_top_k_follows_its_schedule(tmp_path):
    """The Trainer's linear warm-up raises the learning rate over steps 0-56: SparseAdamW
    has the hook send those as 1-bit signs (and the first 50 at least), then six times as
    many more (the rest of this short run), then top-k; nothing is sent dense."""
    pytest.importorskip("transformers", reason="transformers is not installed: pip install 'gradsparse[transformers]'")
    out = tmp_path / "result.json"
    _run(
        _torchrun(
            HERE / "transformers_script.py", str(out), str(tmp_path / "trainer"), "allgather", "sparse_adamw_topk"
        )
    )
    result = json.loads(out.read_text())
    assert result["optimizer"] == "SparseAdamW" and result["steps"] == 64
    # the peak (step 56) is the last step whose learning rate rose: 58 steps, then 6 x 58 more
    assert (result["start_step"], result["sign_warmup_steps"]) == (0, 7 * 58)
    assert result["held"] > 0 and result["idle_residual"] == 0.0  # what the signs did not carry is kept
    assert 0 < result["bytes_sent"] < 0.1 * result["dense_bytes"]  # no dense step


def test_transformers_helper_refuses_gradient_clipping_with_sparse_adamw(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install 'gradsparse[transformers]'")
    from gradsparse.integrations.transformers import sparse_gradients

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = transformers.Trainer(model=torch.nn.Linear(4, 2), args=args)
    with pytest.raises(ValueError, match=r"max_grad_norm=1\.0 would clip SparseAdamW's update direction"):
        sparse_gradients(trainer, "sign", sparse_adamw=True)  # the Trainer's default clips
    assert trainer.optimizer_cls_and_kwargs is None and not trainer.callback_handler.callbacks[0:0]
    args.max_grad_norm = 0.0
    trainer.create_optimizer()  # the Trainer's own AdamW
    with pytest.raises(ValueError, match="the Trainer was given one"):
        sparse_gradients(trainer, "sign", sparse_adamw=True)


@pytest.mark.parametrize("collective", ["allgather", "shared_topk", "sparse_adamw"])
def test_accelerate_prepared_model_with_gradient_accumulation(collective, tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install 'gradsparse[accelerate]'")
    out = tmp_path / "result.json"
    _run(_torchrun(HERE / "accelerate_script.py", str(out), collective))
    result = json.loads(out.read_text())
    assert result["distributed"].endswith("MULTI_CPU")
    assert result["batches"] == 16
    assert result["steps"] == result["batches"] // 2  # the hook runs on the synchronising steps only
    assert 0 < result["bytes_sent"] < result["dense_bytes"] / 5
    assert result["moment_steps"] == ([result["steps"]] if collective == "sparse_adamw" else [])
