"""The ``sign`` compressor's route on real gloo ranks (and the ``quantize`` compressor's, the
same route): sums equal to a reference computed apart (each rank's scaled signs or
quantised levels, decoded by hand), conserved error feedback, identical
replicas; faults that stop every rank; no host-syncing op in a step; refused options."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gradsparse as gs

from .harness import check_on_ranks, gather_all, run_distributed
from .test_sync_free import assert_faults_reached_every_rank, assert_no_host_sync, faults, syncing_ops


def _scaled_sign(values: torch.Tensor, block: int, bits: int = 1) -> torch.Tensor:
    """What a rank sends of one parameter, written out apart from the compressor: per block
    of ``block`` entries (the parameter's own), sign (zero counts as +) times the block's
    mean magnitude rounded to bfloat16; with ``bits`` > 1, the entry's nearest of the levels
    ``-L..L`` (``L = 2**(bits-1) - 1``) times the block's largest magnitude over L."""
    out = torch.zeros(values.numel(), dtype=torch.float64)
    levels = 2 ** (bits - 1) - 1
    for start in range(0, values.numel(), block):
        chunk = values[start : start + block]
        if bits == 1:
            scale = chunk.double().abs().mean().float().to(torch.bfloat16).double()
            out[start : start + block] = torch.where(chunk >= 0, 1.0, -1.0) * scale
        else:
            scale = (chunk.abs().max() / levels).to(torch.bfloat16).float()
            level = (chunk / scale).round().clamp(-levels, levels) if scale > 0 else torch.zeros_like(chunk)
            out[start : start + block] = level.double() * scale.double()
    return out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(300, 40)  # 12000 + 40 entries: partial last blocks for 64 and 1000
        self.idle = nn.Linear(10, 7)  # no forward uses it

    def forward(self, x):
        return self.lin(x)


def _exact_and_conserved(rank, world, block, bits):
    """Each parameter's sum against the ranks' scaled signs of that parameter alone (blocks
    never straddle two), conservation, identical replicas; the parameter no forward uses
    (find_unused_parameters) sends zeros and keeps no residual."""
    torch.manual_seed(0)
    model = _Net()
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    kind = {"compressor": "sign"} if bits == 1 else {"compressor": "quantize", "bits": bits}
    state = gs.register_sparse_hook(ddp, **kind, block=block, min_compress_numel=0)
    assert state.policy.route.name == "sign"
    used = ["lin.weight", "lin.bias"]
    for step in range(3):
        x = torch.randn(8, 300, generator=torch.Generator().manual_seed(100 * step + rank))
        residuals = {n: state.feedback.residual(n) for n in used}
        before = {
            n: torch.zeros(p.numel()) if residuals[n] is None else residuals[n].clone()
            for n, p in zip(used, model.lin.parameters())
        }
        local = nn.Linear(300, 40)
        local.load_state_dict(model.lin.state_dict())
        local(x).pow(2).sum().backward()  # this rank's own gradient, computed apart
        ddp.zero_grad()
        ddp(x).pow(2).sum().backward()
        for name, mine, param in zip(used, (local.weight, local.bias), (model.lin.weight, model.lin.bias)):
            compensated = gather_all(mine.grad.reshape(-1) + before[name])
            after = gather_all(state.feedback.residual(name).clone())
            out = param.grad.reshape(-1)
            reference = sum(_scaled_sign(c, block, bits) for c in compensated)
            assert_close(out.double() * world, reference, rtol=4e-3, atol=1e-6)  # a bfloat16 rounding apart at most
            # conservation: what came in (gradients + old residuals) is what was summed plus kept
            kept = sum(a.double() for a in after)
            assert_close(out.double() * world + kept, sum(c.double() for c in compensated), rtol=1e-5, atol=1e-6)
            copies = gather_all(out)
            assert all(torch.equal(copies[0], c) for c in copies), "replicas differ"
        for name in ("idle.weight", "idle.bias"):
            residual = state.feedback.residual(name)
            assert residual is None or not residual.any(), f"{name} gathered a residual"
    assert all(p.grad is None for p in model.idle.parameters())
    assert state.counters.selected == 3 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("world,block,bits", [(2, 64, 1), (3, 1000, 1), (2, 64, 2)])
def test_sums_are_exact_and_mass_is_conserved(world, block, bits):
    check_on_ranks(_exact_and_conserved, world, block, bits)


def test_faults_reach_every_rank():
    """A NaN on one rank; then one rank's encoding fails (test_sync_free's scenario)."""
    results = run_distributed(faults, 3, {"compressor": "sign"}, "route", float("nan"))
    assert_faults_reached_every_rank(results)


def _mismatched_blocks(rank, world):
    model = nn.Linear(300, 40, bias=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    kind = {"compressor": "sign"} if rank == 0 else {"compressor": "quantize", "bits": 2}
    gs.register_sparse_hook(ddp, **kind, block=64 if rank == 0 else 128, min_compress_numel=0)
    try:
        ddp(torch.randn(4, 300)).sum().backward()
        return "none"
    except Exception as exc:
        return type(exc).__name__ + ": " + str(exc)


def test_ranks_with_different_block_sizes_stop():
    for error in run_distributed(_mismatched_blocks, 2):
        assert "PeerError" in error and "rank 0: (12000, 64, 188, 1), rank 1: (12000, 128, 94, 2)" in error, error


@pytest.mark.parametrize("compressor", [{"compressor": "sign"}, {"compressor": "quantize", "bits": 4}])
def test_a_step_makes_no_host_sync(compressor):
    """test_sync_free's profile of steps 3-5 on every thread, on the sign route."""
    assert_no_host_sync(run_distributed(syncing_ops, 2, compressor))


def _refused(rank, world):
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(8, 8))
    errors = []
    for options in ({"collective": "oktopk"}, {"momentum": 0.9}, {"route": "sparse"}, {"block": 0}):
        try:
            gs.SparseHookState("sign", **options) if "block" not in options else gs.register_sparse_hook(
                ddp, "sign", **options
            )
            errors.append("none")
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def test_options_it_cannot_honour_are_refused():
    collective, momentum, route, block = run_distributed(_refused, 1)[0]
    assert "`collective` must be 'allgather'" in collective
    assert "`momentum` must be 0" in momentum
    assert "`route` must be 'sign'" in route
    assert "`block`" in block and "got 0" in block


def _sign_warm_up_hands_over(rank, world, collective):
    """A top-k hook with a sign warm-up (SparseAdamW's): step 0 dense, steps 1-2 scaled signs
    (against the reference written out above), steps 3-4 top-k; error feedback carries
    across each switch, conserved, and replicas stay identical."""
    torch.manual_seed(0)
    model = nn.Linear(300, 40)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(
        ddp, "topk", density=0.05, collective=collective, min_compress_numel=0, start_step=1, sign_warmup_steps=2
    )
    routes = []
    for step in range(5):
        x = torch.randn(8, 300, generator=torch.Generator().manual_seed(100 * step + rank))
        before = state.feedback.residual("weight")
        before = torch.zeros(model.weight.numel()) if before is None else before.clone()
        local = nn.Linear(300, 40)
        local.load_state_dict(model.state_dict())
        local(x).pow(2).sum().backward()
        ddp.zero_grad()
        ddp(x).pow(2).sum().backward()
        compensated = gather_all(local.weight.grad.reshape(-1) + before)
        out = model.weight.grad.reshape(-1).double() * world
        after = state.feedback.residual("weight")
        kept = sum(a.double() for a in gather_all(after.clone())) if after is not None else 0.0
        assert_close(out + kept, sum(c.double() for c in compensated), rtol=1e-5, atol=1e-6)  # conserved
        if step in (1, 2):
            assert_close(out, sum(_scaled_sign(c, 256) for c in compensated), rtol=4e-3, atol=1e-6)
        routes.append(
            "dense"
            if after is None or not after.any()
            else "signs"
            if out.count_nonzero() > 0.5 * out.numel()
            else "topk"
        )
        copies = gather_all(model.weight.grad.reshape(-1))
        assert all(torch.equal(copies[0], c) for c in copies), "replicas differ"
    return routes


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_a_sign_warm_up_hands_over_to_top_k_and_conserves(collective):
    for routes in run_distributed(_sign_warm_up_hands_over, 2, collective):
        assert routes == ["dense", "signs", "signs", "topk", "topk"], routes
