"""Numerics and long runs through the hook on real gloo ranks."""

import pytest
import torch
from torch import nn

import gradsparse as gs

from .harness import check_on_ranks, flat_params, gather_all, run_distributed
from .test_ddp_hook import loss_of, make_model


def _identical(tensor):
    copies = gather_all(tensor)
    return all(torch.equal(copies[0], c) for c in copies)


def _amp_with_forced_overflow(rank, world):
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    state = gs.register_sparse_hook(ddp, "topk", density=0.05, grad_scaler=scaler)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    skipped = 0
    for step in range(12):
        opt.zero_grad()
        loss = loss_of(ddp, rank, step)
        if step in (4, 9) and rank == world - 1:
            loss = loss * float("inf")  # one rank overflows: every rank must skip the step
        before = flat_params(model)
        residuals = {n: t.clone() for n, t in state.feedback.residuals}
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step in (4, 9):
            assert torch.equal(flat_params(model), before), "an overflow step changed the weights"
            assert all(torch.equal(residuals[n], t) for n, t in state.feedback.residuals)
            assert scaler.get_scale() == scale / 2
            skipped += 1
        assert _identical(flat_params(model))
    assert state.stats()["nonfinite_buckets"] >= 2
    return skipped


def test_amp_grad_scaler_overflow_is_skipped_everywhere_and_spares_the_residual():
    assert run_distributed(_amp_with_forced_overflow, 2) == [2, 2]


def _low_precision(rank, world, dtype):
    model = make_model().to(dtype)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(ddp, "sampled_topk", density=0.05)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(10):
        opt.zero_grad()
        x = torch.randn(16, 20, generator=torch.Generator().manual_seed(rank * 100 + step))
        ddp(x.to(dtype)).float().pow(2).mean().backward()
        opt.step()
        assert all(p.grad.dtype == dtype for p in ddp.parameters())
    assert _identical(flat_params(model))
    return state.stats()["bytes_sent"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_and_bf16_gradients(dtype):
    sent = run_distributed(_low_precision, 2, dtype)
    assert sent[0] > 0


def _odd_gradients(rank, world):
    torch.manual_seed(0)
    model = nn.Linear(100, 100, bias=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    gs.register_sparse_hook(ddp, "topk", density=0.01, min_compress_numel=0)
    cases = {
        "zeros": torch.zeros(100, 100),
        "outlier": torch.zeros(100, 100).index_put_((torch.tensor([3]), torch.tensor([7])), torch.tensor(1e30)),
        "denormal": torch.full((100, 100), 1e-40) * (rank + 1),
    }
    for name, g in cases.items():
        model.weight.grad = None
        (ddp(torch.eye(100)) * g.t()).sum().backward()
        got = model.weight.grad
        assert bool(torch.isfinite(got).all()), name
        assert _identical(got), name
        if name == "outlier":
            assert float(got[3, 7]) == pytest.approx(1e30)  # the outlier is sent whole, averaged
        if name == "zeros":
            assert not got.any()


def test_zero_outlier_and_denormal_gradients():
    check_on_ranks(_odd_gradients, 2)


def _soak(rank, world, steps):
    def rss_mb():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(ddp, "sampled_topk", density=0.01, collective="split_allgather")
    opt = torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.9)
    rss, norms = [], []
    for step in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank, step % 50).backward()
        opt.step()
        if step % 100 == 99:
            rss.append(rss_mb())
            norms.append(state.stats()["residual_norm"])
    assert _identical(flat_params(model))
    return rss, norms


@pytest.mark.slow
def test_soak_2000_steps_memory_flat_residuals_bounded_replicas_identical():
    for rss, norms in run_distributed(_soak, 2, 2000):
        growth = max(rss[2:]) - rss[2]  # after warm-up (allocator pools, first compiled paths)
        assert growth < 8.0, f"resident memory grew by {growth:.1f} MB: {rss}"
        assert max(norms) < 10 * (sum(norms[:3]) / 3 + 1e-6), f"residual norm is not bounded: {norms}"
