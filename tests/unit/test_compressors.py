import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsparse import compressors as C
from gradsparse.compressors import CompressorState, k_for_density

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def test_available_lists_every_compressor():
    assert C.available() == ["none", "quantize", "randomk", "sampled_topk", "sign", "threshold", "topk", "variance"]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown compressor 'tpok'; expected one of \['none'"):
        C.build("tpok")


@pytest.mark.parametrize("name", ["topk", "sampled_topk", "randomk"])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_density_out_of_range_is_rejected(name, density):
    with pytest.raises(ValueError, match="`density`"):
        C.build(name, density=density)


def test_bad_parameters_are_rejected_at_construction():
    with pytest.raises(ValueError, match=r"`threshold`.*non-negative"):
        C.build("threshold", threshold=-1.0)
    with pytest.raises(ValueError, match="`max_density`"):
        C.build("threshold", threshold=0.1, max_density=0.0)
    with pytest.raises(ValueError, match="`tolerance`"):
        C.build("sampled_topk", tolerance=1.0)
    with pytest.raises(ValueError, match="`alpha`"):
        C.build("variance", alpha=-2)
    with pytest.raises(ValueError, match="`decay`"):
        C.build("variance", decay=1.5)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['densty'\]"):
        C.build("topk", densty=0.1)


def test_k_is_max_one_ceil_density_numel():
    assert k_for_density(0.01, 100) == 1  # not 2: 0.01 * 100 is exactly 1
    assert k_for_density(0.01, 101) == 2
    assert k_for_density(1e-9, 10) == 1
    assert k_for_density(1.0, 7) == 7
    assert k_for_density(0.5, 0) == 0


@pytest.mark.parametrize("numel", [1, 10, 1000, 100_003, 400_000])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.3, 1.0])
def test_topk_selects_exactly_k_largest(numel, density):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    payload = C.build("topk", density=density).compress(x, CompressorState())
    k = max(1, math.ceil(density * numel - 1e-9))
    assert payload.count == k
    assert torch.equal(payload.indices, torch.sort(payload.indices).values)
    assert torch.equal(payload.values, x[payload.indices.long()])
    kth = torch.topk(x.abs(), k).values[-1]
    assert bool((x[payload.indices.long()].abs() >= kth).all())
    assert int((x.abs() > kth).sum()) <= k


@pytest.mark.parametrize("numel", [100, 200_000])
def test_topk_ties_go_to_lower_index(numel):
    x = torch.zeros(numel)
    x[::2] = 1.0  # numel/2 tied entries
    k = 10
    payload = C.build("topk", density=k / numel).compress(x)
    assert payload.indices.tolist() == list(range(0, 2 * k, 2))
    # and the choice does not change between calls
    assert torch.equal(payload.indices, C.build("topk", density=k / numel).compress(x, CompressorState()).indices)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["topk", "sampled_topk", "threshold", "randomk", "none"])
def test_values_keep_the_gradient_dtype(name, dtype):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(dtype)
    params = {"threshold": {"threshold": 1.0}, "none": {}}.get(name, {"density": 0.05})
    comp = C.build(name, **params)
    payload = comp.compress(x, CompressorState())
    assert payload.values.dtype == dtype
    assert payload.indices.dtype == torch.int32
    assert torch.equal(payload.values, x[payload.indices.long()])
    dense = payload.to_dense()
    assert dense.dtype == dtype
    assert torch.equal(dense[payload.indices.long()], payload.values)


def test_threshold_sends_every_entry_at_or_above_it():
    x = torch.tensor([0.5, -0.5, 0.49, 2.0, -3.0, 0.0])
    payload = C.build("threshold", threshold=0.5).compress(x)
    assert payload.indices.tolist() == [0, 1, 3, 4]
    assert C.build("threshold", threshold=10.0).compress(x).count == 0
    assert C.build("threshold", threshold=0.0).compress(x).count == 6


def test_threshold_cap_keeps_the_largest():
    x = torch.arange(1000, dtype=torch.float32)
    payload = C.build("threshold", threshold=0.0, max_density=0.01).compress(x)
    assert payload.indices.tolist() == list(range(990, 1000))


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_sampled_topk_count_within_tolerance(density):
    n = 2_000_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    comp = C.build("sampled_topk", density=density, tolerance=0.1)
    state = CompressorState()
    k = k_for_density(density, n)
    for step in range(3):  # later steps reuse the threshold
        g = x * (1 + 0.1 * step)
        payload = comp.compress(g, state)
        assert 0.9 * k <= payload.count <= 1.1 * k
        smallest_sent = g[payload.indices.long()].abs().min()
        assert int((g.abs() > smallest_sent).sum()) < payload.count  # it is a top set


def test_sampled_topk_on_heavy_ties_falls_back_to_exact():
    x = torch.ones(300_000)
    payload = C.build("sampled_topk", density=0.01).compress(x, CompressorState())
    assert payload.count == 3000
    assert payload.indices.tolist() == list(range(3000))


def test_randomk_same_for_same_step_and_key_and_changes_with_step():
    x = torch.randn(100_000)
    comp = C.build("randomk", density=0.01, seed=7)
    a = comp.compress(x, CompressorState(key="w", step=3))
    b = comp.compress(x * 2, CompressorState(key="w", step=3))
    c = comp.compress(x, CompressorState(key="w", step=4))
    assert a.count == 1000 and torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    assert len(set(a.indices.tolist())) == 1000


def test_randomk_is_uniform():
    counts = torch.zeros(50)
    comp = C.build("randomk", density=0.1)
    for step in range(2000):
        counts[comp.compress(torch.ones(50), CompressorState(step=step)).indices.long()] += 1
    assert counts.sum() == 2000 * 5
    assert float(counts.min()) > 0.8 * 200 and float(counts.max()) < 1.2 * 200


def test_none_sends_everything():
    x = torch.randn(17)
    p = C.build("none").compress(x)
    assert p.count == 17 and torch.equal(p.to_dense(), x)


def _variance_state(n):
    return CompressorState(buffers={name: torch.zeros(n) for name in C.VarianceBased.state_buffers})


def test_variance_sends_nothing_on_the_first_step():
    comp = C.build("variance", alpha=1.0)
    state = _variance_state(100)
    g = torch.randn(100)
    comp.observe(g, state)
    assert comp.compress(g, state).count == 0


def test_variance_prefers_high_signal_low_noise_coordinates():
    """Half the coordinates carry a small steady signal, half a larger mean buried in
    much larger noise. Top-k by magnitude favours the noisy half; the variance criterion
    must favour the steady half."""
    n, steps = 2000, 60
    gen = torch.Generator().manual_seed(0)
    mean = torch.cat([torch.full((n // 2,), 0.1), torch.full((n // 2,), 0.3)])
    noise = torch.cat([torch.full((n // 2,), 0.01), torch.full((n // 2,), 3.0)])
    comp = C.build("variance", alpha=1.0)
    state = _variance_state(n)
    residual = torch.zeros(n)
    sent_steady = sent_noisy = 0
    topk_steady = topk_noisy = 0
    for _ in range(steps):
        g = mean + noise * torch.randn(n, generator=gen)
        comp.observe(g, state)
        r = residual + g
        payload = comp.compress(r, state)
        residual = r.clone()
        residual[payload.indices.long()] = 0
        sent = payload.indices.long()
        sent_steady += int((sent < n // 2).sum())
        sent_noisy += int((sent >= n // 2).sum())
        top = torch.topk(g.abs(), max(1, payload.count)).indices
        topk_steady += int((top < n // 2).sum())
        topk_noisy += int((top >= n // 2).sum())
    assert sent_steady > 5 * sent_noisy
    assert topk_noisy > topk_steady


def test_variance_needs_its_state():
    with pytest.raises(ValueError, match="CompressorState"):
        C.build("variance").compress(torch.randn(4))


@pytest.mark.parametrize("name", ["topk", "sampled_topk"])
def test_nan_input_is_an_error_not_a_silent_choice(name):
    x = torch.full((100,), float("nan"))
    x[:3] = 1.0
    with pytest.raises(ValueError, match="NaN"):
        C.build(name, density=0.5).compress(x, CompressorState())


def test_empty_tensor():
    for name in ["topk", "sampled_topk", "randomk", "threshold", "none"]:
        params = {"threshold": {"threshold": 1.0}, "none": {}}.get(name, {"density": 0.5})
        p = C.build(name, **params).compress(torch.empty(0), CompressorState())
        assert p.count == 0 and p.numel == 0


@pytest.mark.parametrize("name", ["topk", "sampled_topk"])
def test_state_survives_a_change_of_tensor_length(name):
    """One state reused for a shorter tensor (weight masks shrink the active set) must not
    reuse sample positions past the new end."""
    comp = C.build(name, density=0.01)
    state = CompressorState()
    gen = torch.Generator().manual_seed(0)
    for n in (300_000, 120_000, 300_000, 70_000):
        x = torch.randn(n, generator=gen)
        state.scalars.clear()  # force sampling
        payload = comp.compress(x, state)
        assert 0.9 * k_for_density(0.01, n) <= payload.count <= 1.1 * k_for_density(0.01, n)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["topk", "sampled_topk", "threshold", "randomk", "none"]),
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    density=st.sampled_from([1e-9, 1e-3, 0.5, 1.0]),
    poison=st.sampled_from(["none", "nan", "inf", "-inf"]),
    seed=st.integers(0, 1000),
)
def test_hostile_input_round_trips_or_raises_clearly(name, shape, dtype, density, poison, seed):
    """Arbitrary shapes, dtypes, NaN/inf, empty tensors and extreme densities: a payload
    either round-trips exactly (sent values are the input's) or compression raises a
    ValueError that says why."""
    x = torch.randn(shape or [], generator=torch.Generator().manual_seed(seed)).to(dtype)
    if poison != "none" and x.numel():
        x.view(-1)[seed % x.numel()] = float(poison)
    params = {"threshold": {"threshold": density}, "none": {}}.get(name, {"density": density})
    comp = C.build(name, **params)
    try:
        payload = comp.compress(x, CompressorState())
    except ValueError as exc:
        assert "NaN" in str(exc)
        return
    payload.validate()
    flat = x.reshape(-1)
    sent = flat[payload.indices.long()]
    assert torch.equal(sent.isnan(), payload.values.isnan())
    assert torch.equal(torch.nan_to_num(sent), torch.nan_to_num(payload.values))
    dense = payload.to_dense()
    assert dense.numel() == flat.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_gathering_pass_matches_torch_with_and_without_the_compiled_kernel(dtype):
    """Magnitudes.at_least (compiled one-pass kernel when numba is there) == abs, ge, nonzero."""
    from gradsparse import kernels as _kernels
    from gradsparse.compressors.base import CompressorState
    from gradsparse.compressors.selection import Magnitudes

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50_000, generator=gen).to(dtype)
    x[::997] = 1.5  # ties
    x[5], x[6], x[7], x[8] = float("nan"), float("inf"), float("-inf"), -0.0
    state = CompressorState("k")
    for threshold in (0.0, 1.5, 2.0, 1e-30, 10.0, float("inf")):
        expected = torch.nonzero(x.abs() >= threshold).squeeze(1)
        for cstate in (None, state):
            got = Magnitudes(x, cstate).at_least(threshold)
            assert got.dtype == torch.int64 and torch.equal(got, expected), (threshold, cstate)
    # more hits than the reused buffer holds: it grows and gathers again
    state.scratch["collect"] = torch.empty(10, dtype=torch.int64)
    assert torch.equal(Magnitudes(x, state).at_least(0.0), torch.nonzero(x.abs() >= 0).squeeze(1))
    if dtype in (torch.float32, torch.float64) and _kernels.available():
        assert _kernels.collect_abs_at_least(x, 1.5, torch.empty(4, dtype=torch.int64)) == int((x.abs() >= 1.5).sum())
    assert _kernels.collect_abs_at_least(x[::2], 1.5, torch.empty(4, dtype=torch.int64)) is None  # not contiguous


def test_compressors_give_the_same_payload_with_and_without_the_compiled_kernel(monkeypatch):
    from gradsparse import kernels as _kernels

    x = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    names = {"topk": {"density": 0.01}, "sampled_topk": {"density": 0.01}, "threshold": {"threshold": 2.5}}
    fast = {n: C.build(n, **kw).compress(x, CompressorState(n)) for n, kw in names.items()}
    monkeypatch.setattr(_kernels, "collect_abs_at_least", lambda *args: None)
    for name, kw in names.items():
        slow = C.build(name, **kw).compress(x, CompressorState(name))
        assert torch.equal(slow.indices, fast[name].indices) and torch.equal(slow.values, fast[name].values), name


def test_exact_count_is_what_topk_sends_and_none_where_the_data_decide():
    from gradsparse.engine.compressor_states import CompressorStates

    topk = C.build("topk", density=0.01)
    for numel in (1, 99, 1000, 12345):
        assert topk.exact_count(numel) == topk.compress(torch.randn(numel)).count
    assert topk.exact_count(0) == 0
    for name, params in (("sampled_topk", {"density": 0.01}), ("threshold", {"threshold": 0.1}), ("randomk", {})):
        assert C.build(name, **params).exact_count(1000) is None
    layout = (("a", 1000), ("b", 250))
    assert CompressorStates(topk, "bucket").exact_count(topk, layout, 1250) == 13
    assert CompressorStates(topk, "layer").exact_count(topk, layout, 1250) == 10 + 3  # per parameter, summed
    assert (
        CompressorStates(C.build("sampled_topk"), "bucket").exact_count(C.build("sampled_topk"), layout, 1250) is None
    )
