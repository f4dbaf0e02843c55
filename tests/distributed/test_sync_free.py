"""The sync-free device route (``sync_free=True``) on real gloo ranks: exact sums against a
reference computed apart, conserved error feedback, identical replicas; no host-syncing op
in a training step (profiled on every thread); faults that stop every rank; only the
primitives NCCL has, with sizes every rank knows."""

import math
from typing import List, Tuple

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.comm import TorchDistBackend
from gradsparse.engine.routes.device import HOST_SYNCING_OPS

from .harness import check_on_ranks, gather_all, run_distributed


def _own_choice(compensated: torch.Tensor, compressor: str, k: int) -> torch.Tensor:
    """What a rank's fixed-budget compressor sends, chosen here independently: the top-k
    magnitudes (``sampled_topk`` too, on this route)."""
    return torch.topk(compensated.abs().double(), k).indices


def _exact_and_conserved(rank, world, compressor, collective, momentum):
    torch.manual_seed(0)
    model = nn.Linear(300, 40, bias=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(
        ddp, compressor, density=0.01, collective=collective, min_compress_numel=0, sync_free=True,
        momentum=momentum,
    )  # fmt: skip
    numel, k = model.weight.numel(), math.ceil(0.01 * model.weight.numel())
    velocity = torch.zeros(numel)
    for step in range(2 * world + 1):
        x = torch.randn(8, 300, generator=torch.Generator().manual_seed(100 * step + rank))
        before = state.feedback.residual("weight")
        before = torch.zeros(numel) if before is None else before.clone()
        local = nn.Linear(300, 40, bias=False)
        local.load_state_dict(model.state_dict())
        local(x).pow(2).sum().backward()  # this rank's own gradient, computed apart
        ddp.zero_grad()
        ddp(x).pow(2).sum().backward()
        velocity = momentum * velocity + local.weight.grad.reshape(-1)
        compensated = gather_all((velocity if momentum else local.weight.grad.reshape(-1)) + before)
        after = gather_all(state.feedback.residual("weight").clone())
        out = model.weight.grad.reshape(-1)
        if compressor == "randomk":  # every rank draws the same coordinates
            chosen = [torch.nonzero(out).squeeze(1)] * world
            assert chosen[0].numel() <= k
        elif collective == "shared_topk":
            chosen = [_own_choice(compensated[step % world], compressor, k)] * world  # the leader's
        else:
            chosen = [_own_choice(c, compressor, k) for c in compensated]
        reference = torch.zeros(numel, dtype=torch.float64)
        for c, idx in zip(compensated, chosen):
            reference[idx] += c.double()[idx]
        assert_close(out.double() * world, reference, rtol=1e-5, atol=1e-5)
        # conservation: what came in (gradients + old residuals) is what was summed plus kept
        kept = sum(a.double() for a in after)
        assert_close(out.double() * world + kept, sum(c.double() for c in compensated), rtol=1e-5, atol=1e-5)
        if momentum:  # momentum factor masking: the sent coordinates' velocity is cleared
            mine = chosen[rank]
            velocity[mine] = 0
            assert_close(state.feedback.velocity.tensors["weight"].reshape(-1), velocity, rtol=1e-5, atol=1e-5)
        copies = gather_all(out)
        assert all(torch.equal(copies[0], c) for c in copies), "replicas differ"
    assert state.policy.device is not None and state.policy.device.rounds == 2 * world + 1


def _with_triton(rank, world, momentum):
    """The same checks, the compensation done by the Triton kernel (interpreted on CPU)."""
    from gradsparse.engine.routes.device import DeviceRoute

    passes = []
    original = DeviceRoute._compensate_fused

    def counted(self, state, step):
        done = original(self, state, step)
        passes.append(done)
        return done

    DeviceRoute._compensate_fused = counted
    _exact_and_conserved(rank, world, "topk", "allgather", momentum)
    return passes


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_triton_pass_under_the_interpreter(monkeypatch, momentum):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks before they import Triton
    for passes in run_distributed(_with_triton, 2, momentum):
        assert passes and all(passes), passes


@pytest.mark.parametrize(
    "world,compressor,collective,momentum",
    [(2, "topk", "allgather", 0.0), (3, "topk", "allgather", 0.0), (2, "sampled_topk", "allgather", 0.0),
     (2, "randomk", "allgather", 0.0), (2, "topk", "shared_topk", 0.0), (3, "topk", "shared_topk", 0.0),
     (2, "topk", "allgather", 0.9)],
)  # fmt: skip
def test_sums_are_exact_and_mass_is_conserved(world, compressor, collective, momentum):
    check_on_ranks(_exact_and_conserved, world, compressor, collective, momentum)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 64))


def syncing_ops(rank, world, options):
    """Train a ~1.3M-parameter MLP with SGD; profile steps 3-5 on every thread (the
    continuation runs on gloo's); count the syncing ops and the Python conversions of a
    tensor to host values (``tolist``, ``item``, ``bool``, ``int``, ``float``)."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    state = gs.register_sparse_hook(ddp, sync_free=True, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(i):
        x = torch.randn(32, 256, generator=torch.Generator().manual_seed(10 * i + rank))
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()

    for i in range(3):
        step(i)
    conversions: List[str] = []
    originals = {}
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        originals[name] = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, **kwargs):
            conversions.append(_name)
            return originals[_name](self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    selected = state.counters.selected
    try:
        with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
            for i in range(3, 6):
                step(i)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    names = [e.name for e in prof.events()]
    syncing = sorted({n for n in names if n in HOST_SYNCING_OPS})
    hook_ran = state.counters.selected > selected  # the profiled steps went through a route
    assert state.policy.device is not None or state.policy.route.sync_free
    copies = gather_all(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return syncing, sorted(set(conversions)), hook_ran, all(torch.equal(copies[0], c) for c in copies)


def assert_no_host_sync(results):
    for syncing, conversions, hook_ran, identical in results:
        assert hook_ran
        assert syncing == [], f"host-syncing ops in a step: {syncing}"
        assert conversions == [], f"tensors converted to host values in a step: {conversions}"
        assert identical


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_a_training_step_makes_no_host_sync(collective):
    options = {"compressor": "topk", "density": 0.01, "collective": collective}
    assert_no_host_sync(run_distributed(syncing_ops, 2, options))


def _syncing_route_for_contrast(rank, world):
    """The route CUDA tensors took before (``sync_free=False``) does sync: the test above
    would see it."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    gs.register_sparse_hook(ddp, "topk", density=0.01, sync_free=False)
    x = torch.randn(32, 256)
    ddp(x).pow(2).mean().backward()
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
        ddp(x).pow(2).mean().backward()
    return sum(e.name in HOST_SYNCING_OPS for e in prof.events())


def test_the_syncing_route_is_seen_by_the_same_count():
    assert all(n > 0 for n in run_distributed(_syncing_route_for_contrast, 2))


def faults(rank, world, options, route, bad):
    """A non-finite gradient (``bad``) on one rank: NaN everywhere, state kept on every
    rank. Then rank 1's selection on ``state.policy.<route>`` fails: it raises its own
    error, every other rank a PeerError. (Also the sign route's test.)"""
    model = nn.Linear(300, 40, bias=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(ddp, min_compress_numel=0, **options)
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(rank))
    ddp(x).sum().backward()
    before = state.feedback.residual("weight").clone()
    model.zero_grad()
    corrupted = x.clone()
    if rank == world - 1:
        corrupted[0, 0] = bad
    ddp(corrupted).sum().backward()
    all_nan = bool(torch.isnan(model.weight.grad).all())
    kept = torch.equal(state.feedback.residual("weight"), before)
    counted = state.counters.nonfinite_buckets
    failing = getattr(state.policy, route)
    assert failing is not None
    if rank == 1:
        failing.select = _boom
    try:
        ddp(x).sum().backward()
        error = "none"
    except Exception as exc:
        error = type(exc).__name__ + ": " + str(exc)
    return all_nan, kept, counted, error


def _boom(*args, **kwargs):
    raise RuntimeError("boom: this rank's selection failed")


def assert_faults_reached_every_rank(results):
    for rank, (all_nan, kept, counted, error) in enumerate(results):
        assert all_nan and kept and counted == 1
        if rank == 1:
            assert "boom" in error, error
        else:
            assert "PeerError" in error and "rank(s) [1] failed" in error, error


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_faults_reach_every_rank(collective):
    options = {"compressor": "topk", "density": 0.01, "collective": collective, "sync_free": True}
    assert_faults_reached_every_rank(run_distributed(faults, 3, options, "device", float("inf")))


class RecordingBackend(TorchDistBackend):
    """Records each transport primitive the collectives call, with its sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[str, Tuple[int, ...]]] = []

    def _allgather_fixed(self, tensor):
        self.calls.append(("allgather", (tensor.numel() * tensor.element_size(),)))
        return super()._allgather_fixed(tensor)

    def _alltoall(self, tensor, send_counts, recv_counts):
        self.calls.append(("alltoall", tuple(send_counts) + tuple(recv_counts)))
        return super()._alltoall(tensor, send_counts, recv_counts)

    def _broadcast(self, tensor, root):
        self.calls.append(("broadcast", (tensor.numel() * tensor.element_size(),)))
        return super()._broadcast(tensor, root)

    def _sendrecv(self, send, peer, recv_numel):
        self.calls.append(("sendrecv", (send.numel(), recv_numel)))
        return super()._sendrecv(send, peer, recv_numel)

    def _allreduce_native(self, tensor):
        self.calls.append(("allreduce", (tensor.numel(),)))
        return super()._allreduce_native(tensor)


def _primitives(rank, world, collective):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
    backend = RecordingBackend()
    gs.register_sparse_hook(ddp, "topk", density=0.01, collective=collective, backend=backend, sync_free=True)
    for i in range(3):
        ddp(torch.randn(16, 256, generator=torch.Generator().manual_seed(i + rank))).pow(2).mean().backward()
    return backend.calls


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_only_primitives_nccl_has_with_sizes_every_rank_knows(collective):
    calls = run_distributed(_primitives, 2, collective)
    assert calls[0], "nothing recorded"
    for mine in calls:
        assert {op for op, _ in mine} <= {"allgather", "broadcast", "alltoall", "allreduce"}, mine
    # the same primitives with the same sizes on every rank: equal-size allgathers, and
    # all-to-alls whose splits every rank knows (the small parameters' ordered sum)
    assert [op for op, _ in calls[0]] == [op for op, _ in calls[1]]
    for (op, a), (_, b) in zip(calls[0], calls[1]):
        if op in ("allgather", "broadcast"):
            assert a == b, (op, a, b)
        else:
            half = len(a) // 2
            assert a[:half] == b[half:][::-1] or op == "allreduce", (op, a, b)
    assert any(op == ("broadcast" if collective == "shared_topk" else "allgather") for op, _ in calls[0])


def test_sync_free_is_validated():
    with pytest.raises(ValueError, match=r"`sync_free` to be True, False or None, but got 'yes'"):
        gs.SparseHookState("topk", sync_free="yes")
    with pytest.raises(ValueError, match=r"sync_free=True. needs a fixed-budget compressor.*'threshold'"):
        gs.SparseHookState("threshold", sync_free=True)
    with pytest.raises(ValueError, match=r"sync_free=True. needs.*RecursiveDoubling"):
        gs.SparseHookState("topk", collective="recursive_doubling", sync_free=True)
    assert gs.SparseHookState("threshold").policy.device is None  # auto: not for this compressor
    assert gs.SparseHookState("topk").policy.device is not None  # auto: for CUDA gradients


def _mismatched_sizes(rank, world):
    """comm.fixed on its own: a rank that sends for another tensor size is marked on every
    rank, and the route's flag check raises there."""
    from types import SimpleNamespace

    from gradsparse.comm import PeerError, fixed
    from gradsparse.engine.routes.device import act_on_flags

    backend, context = TorchDistBackend(), {}
    values, indices = torch.ones(5), torch.arange(5, dtype=torch.int32)
    numel = 100 + (rank == world - 1)
    gathered = fixed.gather_fixed(backend, values, indices, torch.zeros((), dtype=torch.int64), numel, context).wait()
    out = gathered.write(torch.empty(numel), 1.0)
    state = SimpleNamespace(counters=SimpleNamespace(nonfinite_buckets=0))
    try:
        act_on_flags([fixed.FlagCopy(gathered.flags, 7)], state)
        error = "none"
    except PeerError as exc:
        error = str(exc)
    return bool(gathered.bad), bool(torch.isnan(out).all()), error


def test_a_peer_sending_for_another_size_stops_every_rank():
    for bad, all_nan, error in run_distributed(_mismatched_sizes, 3):
        assert bad and all_nan
        assert "another bucket layout" in error and "at step 7" in error, error
