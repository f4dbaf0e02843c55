"""The CPU sparse route's two shortcuts, on real gloo ranks: with an exact budget (``topk``)
every rank knows every rank's count, so the sum goes out without the blocking header
exchange; and where the compressed parameters lie between the biases in DDP's bucket,
compensation reads them where they lie and the decode writes the averages there, with no
gathered copy of the region. Checked against a reference computed apart: exact sums,
conserved error feedback, identical replicas, and faults that stop every rank."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.comm import TorchDistBackend
from gradsparse.engine.routes.sparse import SparseRoute

from .harness import gather_all, run_distributed
from .test_sync_free import assert_faults_reached_every_rank, faults


class CountingBackend(TorchDistBackend):
    """Counts the blocking header exchanges."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges = 0

    def allgather_control(self, tensor):
        self.exchanges += 1
        return super().allgather_control(tensor)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 40), nn.ReLU(), nn.Linear(40, 30))


def _exact_in_bucket(rank, world, compressor, collective):
    model, density = _model(), 0.01
    ddp = nn.parallel.DistributedDataParallel(model)
    backend = CountingBackend()
    state = gs.register_sparse_hook(
        ddp, compressor, density=density, collective=collective, min_compress_numel=100, backend=backend,
        sync_free=False,
    )  # fmt: skip
    weights = ["2.weight", "0.weight"]  # the region, in canonical order; the biases are sent dense
    in_bucket = []
    decode = SparseRoute.decode

    def spied(self, state, step, summed):
        # read in place, and zeroed as read: the sum is scattered into it without a fill
        in_bucket.append(step.in_bucket and step.gathered is None and step.cleared)
        return decode(self, state, step, summed)

    SparseRoute.decode = spied
    params = dict(model.named_parameters())
    for step in range(4):
        x = torch.randn(8, 300, generator=torch.Generator().manual_seed(100 * step + rank))
        kept_before = [state.feedback.residual(n) for n in weights]
        before = torch.cat(
            [torch.zeros(params[n].numel()) if b is None else b.reshape(-1) for n, b in zip(weights, kept_before)]
        )
        local = _model()
        local.load_state_dict(model.state_dict())
        local(x).pow(2).sum().backward()  # this rank's own gradient, computed apart
        lp = dict(local.named_parameters())
        ddp.zero_grad()
        ddp(x).pow(2).sum().backward()
        compensated = gather_all(torch.cat([lp[n].grad.reshape(-1) for n in weights]) + before)
        k = math.ceil(density * compensated[0].numel())
        chosen = [torch.topk(c.abs().double(), k).indices for c in compensated]
        if collective == "shared_topk":
            chosen = [chosen[step % world]] * world  # the leader's
        reference = torch.zeros(compensated[0].numel(), dtype=torch.float64)
        for c, idx in zip(compensated, chosen):
            reference[idx] += c.double()[idx]
        out = torch.cat([params[n].grad.reshape(-1) for n in weights])
        assert_close(out.double() * world, reference, rtol=1e-5, atol=1e-5)
        kept = sum(a.double() for a in gather_all(torch.cat([state.feedback.residual(n).reshape(-1) for n in weights])))
        assert_close(out.double() * world + kept, sum(c.double() for c in compensated), rtol=1e-5, atol=1e-5)
        for bias in ("0.bias", "2.bias"):  # sent dense: the plain average
            assert_close(params[bias].grad, sum(gather_all(lp[bias].grad)) / world, rtol=1e-5, atol=1e-6)
        copies = gather_all(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        assert all(torch.equal(copies[0], c) for c in copies), "replicas differ"
    SparseRoute.decode = decode
    return in_bucket, backend.exchanges, len(state.planner.plans)


@pytest.mark.parametrize(
    "world,compressor,collective", [(2, "topk", "allgather"), (3, "topk", "allgather"), (2, "topk", "shared_topk")]
)
def test_in_bucket_sums_are_exact_and_conserved(world, compressor, collective):
    for in_bucket, exchanges, layouts in run_distributed(_exact_in_bucket, world, compressor, collective):
        # the first step has no residual yet (the region is gathered); every later one reads in
        # place and clears what it read
        assert in_bucket == [False, True, True, True], in_bucket
        if collective == "allgather":  # an exact budget: headers only once per bucket layout, to agree on it
            assert exchanges == layouts == 2, (exchanges, layouts)  # DDP rebuilds its buckets after step 1


def _exchanges(rank, world, compressor, params):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    backend = CountingBackend()
    gs.register_sparse_hook(ddp, compressor, min_compress_numel=100, backend=backend, sync_free=False, **params)
    for step in range(3):
        ddp(torch.randn(8, 300, generator=torch.Generator().manual_seed(step + rank))).pow(2).sum().backward()
    return backend.exchanges


def test_a_count_that_depends_on_the_data_still_exchanges_headers():
    # sampled_topk's count varies; at 20% top-k a bitmap is smaller than the list, and only
    # the header exchange chooses it
    for compressor, params in (("sampled_topk", {"density": 0.01}), ("topk", {"density": 0.2})):
        assert all(n == 3 for n in run_distributed(_exchanges, 2, compressor, params)), compressor


def test_faults_reach_every_rank_without_a_header_exchange():
    options = {"compressor": "topk", "density": 0.01, "collective": "allgather", "sync_free": False}
    assert_faults_reached_every_rank(run_distributed(faults, 3, options, "route", float("nan")))


def _bad_payload(rank, world):
    """comm on its own, once the count is agreed (no header exchange): a rank whose payload
    is malformed (an index outside the tensor) refuses to send it, and every other rank
    stops too."""
    from gradsparse.comm import AllgatherCollective
    from gradsparse.payload import SparsePayload

    backend, numel, context, collective = CountingBackend(), 1000, {}, AllgatherCollective()
    good = SparsePayload(torch.tensor([1, 7, 9], dtype=torch.int32), torch.ones(3), numel)
    collective.reduce(good, backend, count=3, context=context).wait()  # headers: the count is agreed
    indices = torch.tensor([1, 7, 1200 if rank == 1 else 9], dtype=torch.int32)
    payload = SparsePayload(indices, torch.ones(3), numel)
    try:
        collective.reduce(payload, backend, count=3, context=context).wait()
        error = "none"
    except Exception as exc:
        error = str(exc)
    return error, backend.exchanges


def test_a_malformed_payload_stops_every_rank():
    for rank, (error, exchanges) in enumerate(run_distributed(_bad_payload, 3)):
        assert exchanges == 1
        if rank == 1:
            assert "rank 1 refused to send its payload" in error, error
        else:
            assert "rank(s) [1] failed" in error, error


def _other_models(rank, world):
    """Ranks whose tensors differ (another model on one rank) are caught by the first
    step's header exchange, on every rank, before a fixed-size message could differ in size."""
    from gradsparse.comm import AllgatherCollective
    from gradsparse.payload import SparsePayload

    numel = 1001 if rank == 1 else 1000
    k = 5 if rank == 1 else 3
    payload = SparsePayload(torch.arange(k, dtype=torch.int32), torch.ones(k), numel)
    try:
        AllgatherCollective().reduce(payload, TorchDistBackend(), count=k, context={}).wait()
        return "none"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def test_ranks_with_other_tensors_are_refused_on_every_rank():
    for error in run_distributed(_other_models, 3):
        assert "PayloadError" in error and "numel differs across ranks: [1000, 1001, 1000]" in error, error


def _ordered_sums(rank, world):
    """``allreduce_ordered``: in rank order from zero, the same bits on every rank (signed
    zeros included), at a ring allreduce's byte count; for two ranks one allgather."""
    from gradsparse.comm import allreduce_ordered, ring_allreduce_bytes

    backend = TorchDistBackend()
    values = [torch.randn(1001, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    for r, v in enumerate(values):
        v[:4] = torch.tensor([-0.0, -0.0, 0.0, -0.0 if r else 0.0])
    expected = torch.zeros(1001)
    for v in values:
        expected += v
    before = backend.stats.bytes_sent
    out = allreduce_ordered(values[rank].clone(), backend).wait()
    same = torch.equal(out.view(torch.int32), expected.view(torch.int32))  # bit for bit
    return same, backend.stats.bytes_sent - before, ring_allreduce_bytes(1001, 4, world)


@pytest.mark.parametrize("world", [2, 3])
def test_the_ordered_dense_sum_keeps_its_bits_and_bytes(world):
    for same, sent, ring in run_distributed(_ordered_sums, world):
        assert same
        assert abs(sent - ring) <= 4 * (world - 1), (sent, ring)  # ranges of 1001 / P entries, rounded
