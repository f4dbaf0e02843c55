"""The hook in every DDP mode a user might set, on real gloo ranks.

Per parameter, in every mode: the update DDP applies plus the mean residual equals the sum
of the averaged local gradients, recorded independently by a wrapper hook as DDP hands
them over; a parameter that receives no gradient keeps its residual untouched; and with
``compressor="none"`` the result equals DDP's own.
"""

import functools
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gradsparse as gs

from .harness import check_on_ranks, gather_all, run_distributed

STEPS = 6


class Branchy(nn.Module):
    """A trunk, a residual branch that can be skipped, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64))
        self.branch = nn.Linear(64, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.relu(self.trunk(x))
        if use_branch:
            h = h + torch.relu(self.branch(h))
        return self.head(h)


# mode: (DDP keyword arguments, model preparation, whether the branch runs at (rank, step))
MODES = {
    "default": ({}, None, None),
    "gradient_as_bucket_view": ({"gradient_as_bucket_view": True}, None, None),
    "static_graph": ({"static_graph": True}, None, None),
    "unused_on_all_ranks": ({"find_unused_parameters": True}, None, lambda rank, step: step % 2 == 0),
    "unused_on_one_rank": ({"find_unused_parameters": True}, None, lambda rank, step: rank == 0 or step % 2 == 0),
    "no_sync": ({}, None, None),
    "tiny_buckets": ({"bucket_cap_mb": 0.001}, None, None),
    "huge_buckets": ({"bucket_cap_mb": 1000}, None, None),
    "frozen": ({}, "freeze", None),
    "bf16": ({}, "bf16", None),
    "meta_to_empty": ({}, "meta", None),
}


def _model(prepare):
    torch.manual_seed(0)
    if prepare == "meta":
        with torch.device("meta"):
            model = Branchy()
        model.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        return model
    model = Branchy()
    if prepare == "freeze":
        model.trunk[0].requires_grad_(False)
    if prepare == "bf16":
        model = model.to(torch.bfloat16)
    return model


def _batch(model, rank, step):
    gen = torch.Generator().manual_seed(100 * rank + step)
    dtype = next(model.parameters()).dtype
    return torch.randn(16, 20, generator=gen).to(dtype)


class _Recorder:
    """State of the wrapper hook: the sparse hook's state and each local gradient."""

    def __init__(self, state, names):
        self.state, self.names, self.local = state, names, []

    def __reduce__(self):  # never pickled here; DDP only keeps it
        raise TypeError("not picklable")


def recording_hook(rec, bucket):
    """Record this rank's local gradient of every parameter as DDP hands the bucket over,
    then run the sparse hook."""
    step = {}
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        step[rec.names[id(param)]] = grad.detach().double().clone().reshape(-1)
    rec.local.append(step)
    return gs.sparse_allreduce_hook(rec.state, bucket)


def _backward(ddp, model, rank, step, branch, mode):
    use = branch(rank, step) if branch is not None else True
    context = ddp.no_sync() if mode == "no_sync" else nullcontext()
    if mode == "no_sync":  # one accumulated micro-step, then the synchronising one
        with context:
            ddp(_batch(model, rank, 1000 + step), use_branch=use).float().pow(2).mean().backward()
    ddp(_batch(model, rank, step), use_branch=use).float().pow(2).mean().backward()


def _conservation(rank, world, mode, collective="allgather", compressor=("topk", {"density": 0.05}), **options):
    kwargs, prepare, branch = MODES[mode]
    model = _model(prepare)
    ddp = nn.parallel.DistributedDataParallel(model, **kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = gs.compressors.build(compressor[0], **compressor[1])
    state = gs.SparseHookState(chosen, collective=collective, named_parameters=model.named_parameters(), **options)
    rec = _Recorder(state, names)
    ddp.register_comm_hook(rec, recording_hook)
    applied = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    untouched = 0
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        idle = branch is not None and not branch(rank, step)  # the branch gets no gradient here
        before = state.feedback.residual("branch.weight")
        before = before.clone() if idle and before is not None else None
        _backward(ddp, model, rank, step, branch, mode)
        for n, p in model.named_parameters():
            if p.grad is not None:
                applied[n] += p.grad.double().reshape(-1)
        if before is not None:
            assert torch.equal(state.feedback.residual("branch.weight"), before), f"{mode}: an idle residual changed"
            untouched += 1
        opt.step()
    if branch is not None and rank == 1:
        assert untouched >= 2, f"{mode}: the idle branch's residual was never checked"
    local_sum = {}
    for step in rec.local:
        for n, g in step.items():
            local_sum[n] = local_sum.get(n, 0) + g
    checked = 0
    for n, p in model.named_parameters():
        if n not in local_sum:
            assert not p.requires_grad, f"{mode}: {n} never reached the hook"
            continue
        expected = torch.stack(gather_all(local_sum[n])).mean(0)
        residual = state.feedback.residual(n)
        mine = residual.double() if residual is not None else torch.zeros_like(expected)
        mean_residual = torch.stack(gather_all(mine)).mean(0)
        # the hook's sums are float32 (bf16) formed in another order than this float64 reference
        tol = {"rtol": 2e-2, "atol": 2e-2} if prepare == "bf16" else {"rtol": 1e-5, "atol": 1e-6}
        assert_close(applied[n] + mean_residual, expected, **tol, msg=lambda m, n=n: f"{mode} {n}: {m}")
        checked += 1
    copies = gather_all(torch.cat([p.detach().double().reshape(-1) for p in model.parameters()]))
    assert all(torch.equal(copies[0], c) for c in copies), f"{mode}: replicas diverged"
    del ddp
    return checked


@pytest.mark.parametrize("mode", list(MODES))
def test_update_plus_residual_is_the_sum_of_local_gradients(mode):
    checked = run_distributed(_conservation, 2, mode)
    assert all(c >= 3 for c in checked), checked


#: the modes that change what reaches a route (the others change only how DDP calls the
#: hook, which the check above covers on every mode)
ROUTE_MODES = [
    "gradient_as_bucket_view", "static_graph", "unused_on_all_ranks", "unused_on_one_rank", "no_sync", "bf16",
]  # fmt: skip


@pytest.mark.parametrize("mode", ROUTE_MODES)
def test_shared_topk_conserves_in_the_modes_that_change_its_input(mode):
    """The same per-parameter check with one leader's indices per bucket (shared_topk)."""
    checked = run_distributed(_conservation, 2, mode, "shared_topk")
    assert all(c >= 3 for c in checked), checked


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_the_device_route_keeps_the_residual_of_a_branch_no_rank_used(collective):
    """The sync-free device route (CUDA's default) finds a parameter with no gradient on the
    device and sends none of its residual: DDP copies no result into it, so what was sent
    would be lost (the check above, on that route)."""
    checked = run_distributed(functools.partial(_conservation, sync_free=True), 2, "unused_on_all_ranks", collective)
    assert all(c >= 3 for c in checked), checked


@pytest.mark.parametrize("mode", ROUTE_MODES)
def test_sign_conserves_in_the_modes_that_change_its_input(mode):
    """The same check on the sign route (every parameter's blocks its own), in the modes
    that change what reaches a route (its other stages are the device route's): an idle
    branch keeps its residual, sent with a zero scale."""
    checked = run_distributed(_conservation, 2, mode, "allgather", ("sign", {"block": 64}))
    assert all(c >= 3 for c in checked), checked


def _none_equals_ddp(rank, world, modes):
    for mode in modes:
        kwargs, prepare, branch = MODES[mode]
        plain = nn.parallel.DistributedDataParallel(_model(prepare), **kwargs)
        hooked_model = _model(prepare)
        hooked = nn.parallel.DistributedDataParallel(hooked_model, **kwargs)
        gs.register_sparse_hook(hooked, "none", min_compress_numel=0)
        for step in range(4):
            for ddp in (plain, hooked):
                ddp.zero_grad(set_to_none=True)
                _backward(ddp, ddp.module, rank, step, branch, mode)
            for (n, a), b in zip(plain.module.named_parameters(), hooked.parameters()):
                if a.grad is None:
                    assert b.grad is None, f"{mode} {n}: DDP left no gradient, the hook did"
                    continue
                tol = {"rtol": 1e-2, "atol": 1e-3} if prepare == "bf16" else {"rtol": 1e-6, "atol": 1e-7}
                assert_close(b.grad, a.grad, **tol, msg=lambda m, n=n, mode=mode: f"{mode} {n}: {m}")
        del plain, hooked


def test_none_equals_ddp_in_every_mode():
    check_on_ranks(_none_equals_ddp, 2, list(MODES))
