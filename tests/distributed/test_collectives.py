"""Every collective on real gloo ranks: exact sums, identical bits, byte accounting, faults."""

import os
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from gradsparse.comm import PayloadError, TorchDistBackend, build
from gradsparse.comm.auto import AutoCollective
from gradsparse.payload import SparsePayload

from .harness import gather_all, run_distributed

EXACT = ["allgather", "split_allgather", "recursive_doubling", "dense"]
PATTERNS = ["random", "same", "disjoint", "skewed", "dense", "empty_some", "empty_all"]


def make_payload(rank, numel, pattern, density, dtype, seed):
    """Rank ``rank``'s payload for a case; every rank can build every rank's payload."""
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    k = max(1, int(density * numel))
    if pattern == "same":
        idx = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k]
    elif pattern == "disjoint":
        idx = torch.arange(min(rank, numel), numel, 8)[:k]  # world <= 8: no two ranks share an index
    elif pattern == "skewed":  # everything in the first range
        idx = torch.randperm(max(1, numel // 16), generator=gen)[:k]
    elif pattern == "dense":
        idx = torch.arange(numel)
    elif (pattern == "empty_some" and rank % 2 == 0) or pattern == "empty_all":
        idx = torch.empty(0, dtype=torch.int64)
    else:
        idx = torch.randperm(numel, generator=gen)[:k]
    idx = torch.sort(idx).values
    values = torch.randn(idx.numel(), generator=gen).to(dtype)
    return SparsePayload(idx.to(torch.int32), values, numel)


def reference(world, *case):
    out = torch.zeros(case[0], dtype=torch.float64)
    for r in range(world):
        p = make_payload(r, *case)
        out.index_add_(0, p.indices.long(), p.values.double())
    return out


def _exact_for_every_algorithm(rank, world, examples):
    backend = TorchDistBackend()
    checked = []

    @settings(
        max_examples=examples,
        derandomize=True,  # the same cases, in the same order, on every rank
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: ranks must stay in lockstep
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        numel=st.integers(1, 3000),
        pattern=st.sampled_from(PATTERNS),
        density=st.sampled_from([0.001, 0.01, 0.1, 0.5]),
        dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
        seed=st.integers(0, 10_000),
    )
    def check(numel, pattern, density, dtype, seed):
        case = (numel, pattern, density, dtype, seed)
        mine = make_payload(rank, *case)
        expected = reference(world, *case)
        results = {}
        for name in [*EXACT, "auto"]:
            collective = build(name) if name != "auto" else AutoCollective(1e-4, 1e8, 1e10)
            reduced = collective.reduce(mine, backend).wait()
            out = reduced.write(torch.empty(reduced.numel, dtype=dtype))
            tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-6}
            assert_close(out.double(), expected, **tol, msg=lambda m, n=name: f"{n} {case}: {m}")
            copies = gather_all(out)
            assert all(torch.equal(copies[0], c) for c in copies), f"{name} {case}: ranks differ"
            results[name] = out
        # all algorithms that add in rank order agree to the bit
        for name in ("split_allgather", "dense"):
            assert torch.equal(results[name], results["allgather"]), f"{name} {case} differs from allgather"
        checked.append(case)

    check()
    return len(checked)


@pytest.mark.parametrize("world,examples", [(1, 10), (2, 25), (3, 20), (4, 20), (5, 12), (8, 6)])
def test_every_collective_is_exact_and_identical(world, examples):
    counts = run_distributed(_exact_for_every_algorithm, world, examples)
    assert counts[0] == examples


def _accounting(rank, world):
    backend = TorchDistBackend()
    numel, k = 8000, 100
    idx = torch.arange(rank, numel, numel // k, dtype=torch.int32)[:k]
    payload = SparsePayload(idx, torch.ones(k), numel)
    stats = {}
    for name in ("allgather", "dense"):
        before = backend.stats.as_dict()
        build(name).reduce(payload, backend).wait()
        stats[name] = {key: v - before[key] for key, v in backend.stats.as_dict().items()}
    return stats


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_match_the_analytic_formulas(world):
    numel, k = 8000, 100
    for stats in run_distributed(_accounting, world):
        assert stats["allgather"]["bytes_sent"] == (world - 1) * 8 * k
        assert stats["allgather"]["bytes_received"] == (world - 1) * 8 * k
        assert stats["allgather"]["messages"] == 2 * (world - 1)  # the header round, then the payload
        assert stats["dense"]["bytes_sent"] == 2 * (world - 1) * 4 * numel // world
        assert stats["dense"]["bytes_received"] == 2 * (world - 1) * 4 * numel // world


def _oktopk(rank, world, repartition_every):
    backend = TorchDistBackend()
    collective = build("oktopk", repartition_every=repartition_every)
    context = {}
    for step in range(6):
        case = (5000, "skewed" if step % 2 else "random", 0.02, torch.float32, step)
        mine = make_payload(rank, *case)
        exact = reference(world, *case)
        reduced = collective.reduce(mine, backend, context=context).wait()
        out = reduced.write(torch.empty(reduced.numel)).double()
        chosen = out != 0
        # a subset of the exact sum ...
        assert_close(out[chosen], exact[chosen], rtol=1e-5, atol=1e-6)
        # ... holding the largest entries, about k of them
        k = round(sum(make_payload(r, *case).count for r in range(world)) / world)
        assert k <= int(chosen.sum()) <= max(k, 1) * 1.3 + 8 or int((exact != 0).sum()) <= k
        if chosen.any() and (~chosen & (exact != 0)).any():
            assert float(exact[chosen].abs().min()) >= float(exact[~chosen].abs().max())
        # nothing is lost: what each rank gets back, summed over ranks, is what was dropped
        returned = torch.zeros(5000, dtype=torch.float64)
        dropped = ~reduced.kept
        returned.index_add_(0, mine.indices[dropped].long(), mine.values[dropped].double())
        total_returned = sum(gather_all(returned))
        assert_close(total_returned + out, exact, rtol=1e-5, atol=1e-6)
        copies = gather_all(out)
        assert all(torch.equal(copies[0], c) for c in copies)
    return context["oktopk_bounds"]


@pytest.mark.parametrize("world", [3, 4])
def test_oktopk_keeps_the_global_top_k_and_returns_the_rest(world):
    bounds = run_distributed(_oktopk, world, 2)
    assert all(b == bounds[0] for b in bounds)
    assert bounds[0] != [r * 5000 // world for r in range(world + 1)]  # repartitioned


def _mismatch(rank, world):
    backend = TorchDistBackend()
    errors = []
    for name in [*EXACT, "oktopk", "shared_topk", "auto"]:
        collective = build(name) if name != "auto" else AutoCollective(1e-4, 1e8, 1e10)
        numel = 100 + (rank == 1)  # rank 1 disagrees about the tensor size
        payload = SparsePayload(torch.tensor([1, 5], dtype=torch.int32), torch.ones(2), numel)
        try:
            collective.reduce(payload, backend).wait()
        except PayloadError as exc:
            errors.append(str(exc))
        # an out-of-range index on one rank: refused by that rank, reported by every rank
        bad = SparsePayload(torch.tensor([1, 500 if rank == 0 else 5], dtype=torch.int32), torch.ones(2), 100)
        try:
            collective.reduce(bad, backend).wait()
        except (PayloadError, RuntimeError) as exc:
            errors.append(str(exc))
    return errors


def test_bad_input_raises_on_every_rank():
    results = run_distributed(_mismatch, 3)
    for rank, errors in enumerate(results):
        assert len(errors) == 14, errors
        assert all("numel differs across ranks: [100, 101, 100]" in e for e in errors[0::2])
        for e in errors[1::2]:
            assert ("failed before sending" in e) if rank else ("refused to send its payload" in e), e


def _peer_dies(rank, world, how, timeout):
    backend = TorchDistBackend()
    payload = SparsePayload(torch.arange(0, 1000, 10, dtype=torch.int32), torch.ones(100), 1000)
    build("allgather").reduce(payload, backend).wait()  # everyone is connected and working
    if rank == world - 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(timeout + 5)  # hang past the others' timeout, then vanish
        os._exit(0)
    start = time.monotonic()
    try:
        build("split_allgather").reduce(payload, backend).wait()
    except Exception as exc:
        return time.monotonic() - start, f"{type(exc).__name__}: {exc}"
    return time.monotonic() - start, "no error"


@pytest.mark.parametrize("how,limit", [("kill", 10.0), ("hang", 25.0)])
def test_a_dead_or_hung_peer_is_an_error_not_a_hang(how, limit):
    timeout = 15.0
    results = run_distributed(_peer_dies, 3, how, timeout, timeout=timeout, allow_dead=True)
    for status, value in results[:2]:
        assert status == "ok", value
        elapsed, message = value
        assert message != "no error"
        assert elapsed < limit, (elapsed, message)
        if how == "kill":
            assert elapsed < timeout  # the closed connection is noticed before the timeout
        else:
            assert "imeout" in message or "imed out" in message, message


def _probe(rank, world):
    from gradsparse.comm.auto import measure_link

    model = measure_link(TorchDistBackend(), probe_bytes=1 << 20, repeats=3)
    return (model.latency_s, model.bandwidth_Bps, model.memory_Bps)


def test_link_probe_gives_every_rank_the_same_model():
    models = run_distributed(_probe, 2)
    assert models[0] == models[1]  # agreed through an allgather: the most pessimistic figures
    latency, bandwidth, memory = models[0]
    assert 0 < latency < 1 and bandwidth > 1e6 and memory > 1e8


def _probe_sizes(rank, world):
    from gradsparse.comm.auto import measure_link

    backend, models, sent = TorchDistBackend(), [], []
    for seconds in (0.0, 1e3):  # stop at the first size; grow to probe_bytes
        before = backend.stats.bytes_sent
        model = measure_link(backend, probe_bytes=1 << 20, repeats=3, probe_seconds=seconds)
        models.append((model.latency_s, model.bandwidth_Bps, model.memory_Bps))
        sent.append(backend.stats.bytes_sent - before)
    return models, sent


@pytest.mark.parametrize("world", [2, 3])
def test_link_probe_grows_its_message_until_it_takes_long_enough(world):
    results = run_distributed(_probe_sizes, world)
    models, sent = results[0]
    assert all(r[0] == models for r in results)  # every rank took the same size decisions
    calls = 3 + 1  # the timed repeats and median_seconds' warm-up
    tiny = 8 * (2 + 3 * 3 + 1)
    # probe_seconds=0: only the first 64 KiB message; otherwise it grows to the 1 MiB cap
    assert sent[0] == (world - 1) * (calls * (1 << 16) + tiny)
    assert sent[1] > (world - 1) * calls * (1 << 20)
    for latency, bandwidth, memory in models:
        assert 0 < latency < 1 and bandwidth > 1e6 and memory > 1e8


def test_link_probe_rejects_bad_arguments():
    from gradsparse.comm.auto import measure_link

    for name, bad in [("probe_bytes", 0), ("repeats", 0), ("probe_seconds", -1.0)]:
        with pytest.raises(ValueError, match=name):
            measure_link(None, **{name: bad})  # validated before the backend is used
