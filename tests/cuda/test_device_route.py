"""On a CUDA device (skipped without one; run by ``scripts/gpu-check``): the Triton kernel
against its torch reference, torch.topk's ranking of NaN and inf, and the hook on CUDA
gradients with no host sync (``torch.cuda.set_sync_debug_mode("error")``), over NCCL with
one rank and over gloo with two ranks sharing the GPU."""

import pytest
import torch
from torch import nn

import gradsparse as gs
from gradsparse import triton_kernels

from ..distributed.harness import gather_all, run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_kernel_matches_its_reference_on_the_device(momentum):
    if not triton_kernels.available():
        pytest.skip("needs Triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad, residual, velocity = (torch.randn(3_000_001, device="cuda", generator=gen) for _ in range(3))
    grad[17] = float("nan")
    want = triton_kernels.compensate_reference(grad, residual, velocity if momentum else None, momentum)
    got, magnitude = grad.clone(), torch.empty_like(grad)
    flag, new_velocity = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.empty_like(grad)
    triton_kernels.compensate(got, residual, magnitude, flag, velocity if momentum else None, new_velocity, momentum)
    assert int(flag) == want[2] == 1
    if momentum:  # one fused multiply-add may round differently
        torch.testing.assert_close(got, want[0], equal_nan=True)
    else:
        assert torch.equal(got.nan_to_num(7.0), want[0].nan_to_num(7.0))
        assert torch.equal(magnitude.nan_to_num(7.0), want[1].nan_to_num(7.0))


def test_topk_ranks_nan_and_inf_first_on_the_device():
    x = torch.randn(1_000_000, device="cuda")
    x[123], x[456] = float("nan"), -float("inf")
    chosen = set(torch.topk(x.abs(), 1000, sorted=False).indices.tolist())
    assert {123, 456} <= chosen  # what the route's non-finite flag relies on


def _train_without_sync(rank, world, collective, backend_name):
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512)).cuda()
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0] if backend_name == "nccl" else None)
    state = gs.register_sparse_hook(ddp, "topk", density=0.01, collective=collective)  # default: CUDA -> device
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(6):
        x = torch.randn(64, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(10 * i + rank))
        opt.zero_grad()
        if i >= 3:
            torch.cuda.set_sync_debug_mode("error")
        try:
            ddp(x).pow(2).mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.step()
    torch.cuda.synchronize()
    assert state.policy.device is not None and state.policy.device.rounds > 0
    copies = gather_all(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu())
    return all(torch.equal(copies[0], c) for c in copies)


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_the_hook_on_gloo_ranks_sharing_the_gpu_makes_no_sync(collective):
    assert all(run_distributed(_train_without_sync, 2, collective, "gloo"))


def test_the_hook_over_nccl_makes_no_sync():
    import datetime
    import os
    import tempfile

    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as workdir:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(
            "nccl", init_method=f"file://{workdir}/rendezvous", rank=0, world_size=1,
            timeout=datetime.timedelta(seconds=120),
        )  # fmt: skip
        try:
            assert _train_without_sync(0, 1, "allgather", "nccl")
        finally:
            dist.destroy_process_group()
