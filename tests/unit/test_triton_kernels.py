"""The device route's Triton kernel under Triton's interpreter, on CPU, against the torch
reference: bit for bit without momentum, to one rounding with it. The interpreter must be
chosen before Triton is imported, so each case runs in a fresh interpreter process."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CASE = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from gradsparse import triton_kernels as tk

    def run(numel, residual, momentum, bad):
        gen = torch.Generator().manual_seed(numel)
        grad = torch.randn(numel, generator=gen)
        if bad:
            grad[numel // 3] = bad
        res = torch.randn(numel, generator=gen) if residual else None
        vel = torch.randn(numel, generator=gen) if momentum else None
        want = tk.compensate_reference(grad, res, vel, momentum)
        mag, flag = torch.empty(numel), torch.zeros(1, dtype=torch.int32)
        new_vel = torch.empty(numel) if momentum else None
        got = grad.clone()
        tk.compensate(got, res, mag, flag, vel, new_vel, momentum)
        assert flag.item() == want[2], (flag, want[2])
        if momentum:
            torch.testing.assert_close(got, want[0], rtol=1e-6, atol=1e-6, equal_nan=True)
            torch.testing.assert_close(new_vel, want[3], rtol=1e-6, atol=1e-6, equal_nan=True)
        else:
            assert torch.equal(got.nan_to_num(7.0), want[0].nan_to_num(7.0)), "not bit-identical"
            assert torch.equal(mag.nan_to_num(7.0), want[1].nan_to_num(7.0))

    assert tk.usable(torch.empty(3))
    for numel in (1, 1023, 1025, 100_000):
        run(numel, residual=True, momentum=0.0, bad=None)
    run(5000, residual=False, momentum=0.0, bad=None)
    run(5000, residual=True, momentum=0.9, bad=None)
    run(5000, residual=True, momentum=0.0, bad=float("nan"))
    run(5000, residual=False, momentum=0.9, bad=float("-inf"))
    print("ok")
    """
)


def test_kernel_matches_the_torch_reference_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", CASE], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
