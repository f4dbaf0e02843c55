"""shared_topk (ScaleCom's cyclic local top-k) on real gloo ranks: the leader's indices,
every rank's values, an exact sum there, conserved residuals, identical replicas, bytes
as the formulas say, and faults that stop every rank."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.comm import PayloadError, PeerError, SharedTopkCollective, TorchDistBackend, build
from gradsparse.comm.backend import ring_allreduce_bytes
from gradsparse.payload import SparsePayload

from .harness import check_on_ranks, gather_all, run_distributed


def _dense(rank: int, round_: int, numel: int) -> torch.Tensor:
    """Rank ``rank``'s tensor in round ``round_`` (every rank can build every rank's)."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(100 * round_ + rank))


def _leader_topk(tensor: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(tensor.abs().double(), k).indices).values


def _collective_rounds(rank, world, rank_order):
    backend = TorchDistBackend()
    collective = SharedTopkCollective(rank_order=rank_order)
    numel, k = 5000, 50
    for round_ in range(2 * world):
        leader = collective.leader(round_, world)
        assert leader == round_ % world
        mine = _dense(rank, round_, numel)
        chosen = _leader_topk(mine, k).to(torch.int32) if rank == leader else None
        before = backend.stats.as_dict()
        shared = collective.share(chosen, numel, k, backend, leader=leader)
        expected = _leader_topk(_dense(leader, round_, numel), k)
        assert torch.equal(shared.indices.long(), expected), "every rank holds the leader's indices"
        reduced = collective.reduce_at(shared, mine[shared.indices.long()], backend).wait()
        out = reduced.write(torch.empty(numel))
        reference = torch.zeros(numel, dtype=torch.float64)
        for r in range(world):
            reference[expected] += _dense(r, round_, numel).double()[expected]
        assert_close(out.double(), reference, rtol=1e-6, atol=1e-6)
        if rank_order:  # in rank order from zero: the same bits as this float32 loop
            ordered = torch.zeros(k)
            for r in range(world):
                ordered += _dense(r, round_, numel)[expected]
            assert torch.equal(out[expected], ordered)
        copies = gather_all(out)
        assert all(torch.equal(copies[0], c) for c in copies), "ranks differ"
        delta = {key: v - before[key] for key, v in backend.stats.as_dict().items()}
        if rank_order:  # an all-to-all of this rank's range, then an allgather of the ranges
            edges = [r * (k + 2) // world for r in range(world + 1)]
            mine_range = edges[rank + 1] - edges[rank]
            summed = 4 * ((world - 1) * mine_range + (k + 2 - mine_range))
        else:
            summed = ring_allreduce_bytes(k + 2, 4, world)
        received = (4 * (k + 3) if rank != leader else 0) + summed
        assert delta["bytes_received"] == received, delta
        assert reduced.counts == (k,) * world


@pytest.mark.parametrize("world,rank_order", [(2, False), (3, True), (4, False), (5, True)])
def test_the_sum_is_exact_on_the_leaders_indices(world, rank_order):
    check_on_ranks(_collective_rounds, world, rank_order)


def _payloads(rank, world):
    """On payloads: with the same indices everywhere the sum is whole; otherwise only this
    rank's entries at the leader's indices were sent, and ``kept`` says which."""
    backend = TorchDistBackend()
    collective = build("shared_topk")
    numel, context = 1000, {}  # the context counts the rounds of this tensor
    same = torch.arange(0, numel, 7, dtype=torch.int32)
    values = torch.full((same.numel(),), float(rank + 1))
    reduced = collective.reduce(SparsePayload(same, values, numel), backend, context=context).wait()
    assert bool(reduced.kept.all())
    out = reduced.write(torch.empty(numel))
    assert torch.equal(out[same.long()], torch.full((same.numel(),), float(world * (world + 1) // 2)))
    # round 1 is led by rank 1 (of 2+): rank r holds indices r, r+2, r+4, ...
    mine = torch.arange(rank % 2, 200, 2, dtype=torch.int32)
    payload = SparsePayload(mine, torch.ones(mine.numel()), numel)
    reduced = collective.reduce(payload, backend, context=context).wait()
    out = reduced.write(torch.empty(numel))
    assert bool(reduced.kept.all()) == (rank % 2 == 1)
    assert int((out != 0).sum()) == 100 and bool((out[1:200:2] == world // 2).all())


@pytest.mark.parametrize("world", [2, 3])
def test_payloads_send_what_lies_at_the_leaders_indices(world):
    check_on_ranks(_payloads, world)


def _hook_conserves(rank, world, compressor, density):
    torch.manual_seed(0)
    model = nn.Linear(300, 40, bias=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(ddp, compressor, density=density, collective="shared_topk", min_compress_numel=0)
    numel, k = model.weight.numel(), math.ceil(density * model.weight.numel())
    for step in range(2 * world + 1):
        x = torch.randn(8, 300, generator=torch.Generator().manual_seed(100 * step + rank))
        before = state.feedback.residual("weight")
        before = torch.zeros(numel) if before is None else before.clone()
        ddp.zero_grad()
        local = nn.Linear(300, 40, bias=False)
        local.load_state_dict(model.state_dict())
        local(x).pow(2).sum().backward()  # this rank's own gradient, computed apart
        ddp(x).pow(2).sum().backward()
        compensated = gather_all(local.weight.grad.reshape(-1) + before)
        after = gather_all(state.feedback.residual("weight").clone())
        out = model.weight.grad.reshape(-1)
        leader = step % world
        if compressor == "topk":  # the leader's own top-k, chosen independently here
            chosen = _leader_topk(compensated[leader], k)
            assert torch.equal(torch.nonzero(out).squeeze(1), chosen)
            summed = sum(c.double()[chosen] for c in compensated)
            assert_close(out[chosen].double() * world, summed, rtol=1e-5, atol=1e-5)
        assert int((out != 0).sum()) <= k
        # conservation: what came in (gradients + old residuals) is what was summed plus
        # what every rank kept
        kept = sum(a.double() for a in after)
        assert_close(out.double() * world + kept, sum(c.double() for c in compensated), rtol=1e-5, atol=1e-5)
        copies = gather_all(out)
        assert all(torch.equal(copies[0], c) for c in copies)
    assert state.policy.route.rounds == 2 * world + 1
    return state.stats()["bytes_sent"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("compressor,density", [("topk", 0.01), ("sampled_topk", 0.02)])
def test_hook_sends_the_leaders_choice_and_conserves_mass(world, compressor, density):
    assert all(s > 0 for s in run_distributed(_hook_conserves, world, compressor, density))


def _faults(rank, world):
    backend = TorchDistBackend()
    collective = SharedTopkCollective()
    seen = []
    idx = torch.tensor([3, 9, 40], dtype=torch.int32)
    values = torch.ones(3)

    def attempt(fn):
        try:
            fn()
            seen.append("none")
        except (PayloadError, PeerError) as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
        except RuntimeError as exc:  # raised in a future's callback: torch wraps it
            seen.append(str(exc)[str(exc).index("PeerError") :])

    # the leader (rank 0) sends an index past the end: every rank refuses the same bytes
    bad = torch.tensor([3, 9, 4000], dtype=torch.int32)
    attempt(lambda: collective.share(bad if rank == 0 else None, 100, 3, backend, leader=0))
    # the leader passes more than the capacity: it says so, the others stop
    attempt(lambda: collective.share(idx if rank == 1 else None, 100, 2, backend, leader=1))
    # the leader failed before choosing
    attempt(lambda: collective.share(None, 100, 3, backend, leader=0, failed=rank == 0))

    # a non-leader failed, or disagrees about the size: every rank stops after the sum
    def failed_peer():
        shared = collective.share(idx if rank == 0 else None, 100, 3, backend, leader=0)
        collective.reduce_at(shared, values, backend, failed=rank == world - 1).wait()

    def other_size():
        numel = 100 + (rank == world - 1)
        shared = collective.share(idx if rank == 0 else None, numel, 3, backend, leader=0)
        collective.reduce_at(shared, values, backend).wait()

    attempt(failed_peer)
    attempt(other_size)
    # a non-finite rank makes the sum NaN everywhere
    shared = collective.share(idx if rank == 0 else None, 100, 3, backend, leader=0)
    reduced = collective.reduce_at(shared, values, backend, nonfinite=rank == 1).wait()
    seen.append(f"nonfinite={reduced.nonfinite}")
    return seen


def test_faults_stop_every_rank():
    world = 3
    for rank, seen in enumerate(run_distributed(_faults, world)):
        assert seen[0].startswith("PayloadError") and "outside [0, 100)" in seen[0], seen[0]
        if rank == 1:
            assert seen[1].startswith("PayloadError") and "3 indices for a capacity of 2" in seen[1]
        else:
            assert seen[1].startswith("PeerError") and "rank 1" in seen[1], seen[1]
        assert seen[2].startswith("PeerError") and "rank 0" in seen[2], seen[2]
        assert seen[3].startswith("PeerError") and "stops too" in seen[3], seen[3]
        assert seen[4].startswith("PeerError") and "another tensor size" in seen[4], seen[4]
        assert seen[5] == "nonfinite=True"


def _failing_compressor_stops_every_rank(rank, world):
    """A rank whose selection raises under the hook: it raises its own error, the others
    a PeerError (led by it, and led by another rank)."""
    errors = []
    for leader_fails in (True, False):
        model = nn.Linear(300, 40, bias=False)
        ddp = nn.parallel.DistributedDataParallel(model)
        state = gs.register_sparse_hook(ddp, "topk", density=0.01, collective="shared_topk", min_compress_numel=0)
        failing = 0 if leader_fails else 1  # round 0 is led by rank 0
        if rank == failing:
            state.policy.route.compensate = _boom  # type: ignore[method-assign]
        try:
            ddp(torch.randn(4, 300)).sum().backward()
            errors.append("none")
        except Exception as exc:
            errors.append(type(exc).__name__ + ": " + str(exc).splitlines()[0])
    return errors


def _boom(*args, **kwargs):
    raise RuntimeError("boom: this rank's compensation failed")


def test_a_failing_rank_stops_every_rank_under_the_hook():
    for rank, errors in enumerate(run_distributed(_failing_compressor_stops_every_rank, 2)):
        for leader_fails, error in zip((True, False), errors):
            failing = 0 if leader_fails else 1
            if rank == failing:
                assert "boom" in error, error
            else:
                assert "PeerError" in error, error


def test_shared_topk_needs_a_density_budget():
    with pytest.raises(ValueError, match=r"density budget with collective 'shared_topk'.*'threshold'"):
        gs.SparseHookState("threshold", collective="shared_topk")
