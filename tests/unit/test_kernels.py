"""The fused CPU pass and the candidate hint give exactly what the unfused torch path gives."""

import pytest
import torch

import gradsparse.compressors as C
from gradsparse import kernels
from gradsparse.compressors import CompressorState
from gradsparse.error_feedback import ErrorFeedback
from gradsparse.error_feedback.fused import compensate_scan
from gradsparse.payload import Candidates, SparsePayload

needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def _grad(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_residual", [True, False])
def test_compensate_scan_matches_torch(dtype, with_residual):
    sizes = [37, 0, 1000, 16, 5003, 64]  # blocks of 16 and the tails between them
    n = sum(sizes)
    grad = _grad(n, 1, dtype)
    grad[37 + 1000 : 37 + 1000 + 16] = 0  # the 16-entry parameter got no gradient
    residual = _grad(n, 2, dtype) * 0.5 if with_residual else None
    expected = grad + residual if residual is not None else grad.clone()
    for floor in (None, 0.0, 1.25, 3.0, float("inf")):
        g = grad.clone()
        found = kernels.compensate_scan(g, residual, sizes, floor, {})
        assert found is not None and found.finite
        assert torch.equal(g, expected)
        assert found.nonzero == (True, False, True, False, True, True)
        if floor is None:
            assert found.large is None
        else:
            assert found.large is not None
            assert torch.equal(found.large, torch.nonzero(expected.abs() >= floor).squeeze(1))


@needs_numba
def test_compensate_scan_reads_segments_where_they_lie():
    """The segments of a bucket, read in place (with other entries between them), give what
    the gathered flat gradient gives, and are never written."""
    sizes = [1000, 0, 37, 5003, 16]
    bucket = _grad(7000, 5)
    offsets = [5900, 0, 10, 600, 50]  # another order than the bucket's, with gaps between
    bucket[50:66] = 0  # the last parameter got no gradient
    pieces = [bucket[o : o + n] for o, n in zip(offsets, sizes)]
    flat = torch.cat(pieces)
    residual = _grad(flat.numel(), 6) * 0.5
    for floor in (None, 1.25):
        before = bucket.clone()
        into = torch.empty_like(flat)
        found = kernels.compensate_scan(pieces, residual, sizes, floor, {}, into=into)
        expected = kernels.compensate_scan(flat.clone(), residual, sizes, floor, {}, into=torch.empty_like(flat))
        assert found is not None and expected is not None
        assert torch.equal(bucket, before)
        assert torch.equal(into, flat + residual)
        assert (
            (found.finite, found.nonzero)
            == (expected.finite, expected.nonzero)
            == (True, (True, False) + (True,) * 2 + (False,))
        )
        assert (found.large is None and floor is None) or torch.equal(found.large, expected.large)
    with pytest.raises(ValueError, match="needs a residual, an `into`"):
        kernels.compensate_scan(pieces, None, sizes, None, {}, into=torch.empty_like(flat))
    with pytest.raises(ValueError, match=r"segments of \[1000, 0, 37, 5003, 16\] entries, sizes say"):
        kernels.compensate_scan(pieces, residual, [1000, 0, 37, 5004, 15], None, {}, into=torch.empty_like(flat))


@needs_numba
def test_compensate_scan_clears_the_gradient_it_read_and_nothing_else():
    """``clear``: the pieces read are zeroed (the entries between them are not), and
    everything the pass finds is what it finds without clearing."""
    sizes = [1000, 0, 37, 5003, 16]
    bucket = _grad(7000, 5)
    offsets = [5900, 0, 10, 600, 50]
    residual = _grad(sum(sizes), 6) * 0.5
    inside = torch.zeros(7000, dtype=torch.bool)
    for o, n in zip(offsets, sizes):
        inside[o : o + n] = True
    for floor in (None, 1.25):
        cleared, kept = bucket.clone(), bucket.clone()
        into, expected_into = torch.empty(sum(sizes)), torch.empty(sum(sizes))
        pieces = [cleared[o : o + n] for o, n in zip(offsets, sizes)]
        found = kernels.compensate_scan(pieces, residual, sizes, floor, {}, into=into, clear=True)
        expected = kernels.compensate_scan(
            [kept[o : o + n] for o, n in zip(offsets, sizes)], residual, sizes, floor, {}, into=expected_into
        )
        assert found is not None and expected is not None
        assert torch.equal(into, expected_into)
        assert (found.finite, found.nonzero) == (expected.finite, expected.nonzero)
        assert (found.large is None and floor is None) or torch.equal(found.large, expected.large)
        assert torch.equal(cleared[inside], torch.zeros(int(inside.sum())))
        assert torch.equal(cleared[~inside], bucket[~inside])
        flat = bucket[5900:6900].clone()  # a flat gradient, zeroed in place
        kernels.compensate_scan(flat, residual[:1000], [1000], floor, {}, into=torch.empty(1000), clear=True)
        assert not flat.any()
    flat = bucket[:100].clone()
    for residual_, into in ((None, torch.empty(100)), (residual[:100], None), (residual[:100], flat)):
        with pytest.raises(ValueError, match=r"clear=True\) needs a residual and an `into` apart"):
            kernels.compensate_scan(flat, residual_, [100], None, {}, into=into, clear=True)


def test_plan_maps_region_positions_to_the_bucket():
    from gradsparse.engine.plan import BucketPlan

    layout = (("a", 5), ("empty", 0), ("b", 3), ("c", 4))
    offsets = [10, 2, 0, 3]  # b lies first in the bucket, then c, then (after a bias) a
    plan = BucketPlan(layout, offsets, None, small=[(7, 3)], key="a|empty|b|c")
    region = torch.arange(12)
    expected = torch.cat([torch.arange(o, o + n) for (_, n), o in zip(layout, offsets)])
    for dtype in (torch.int32, torch.int64):
        assert torch.equal(plan.in_bucket(region.to(dtype)), expected)
    bucket = torch.arange(15.0)
    assert torch.equal(torch.cat(plan.pieces(bucket)), bucket[expected])


@needs_numba
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_compensate_scan_finds_nonfinite_entries_anywhere(bad):
    for position in (0, 15, 16, 999, 1022):
        g = _grad(1023, 3)
        g[position] = bad
        found = kernels.compensate_scan(g, None, [1023], 1.0, {})
        assert found is not None and not found.finite
    g = torch.full((40,), 3e38)
    found = kernels.compensate_scan(g, torch.full((40,), 3e38), [40], None, {})  # overflows to inf
    assert found is not None and not found.finite


@needs_numba
def test_compensate_scan_grows_its_buffer_and_refuses_what_it_cannot_do():
    scratch = {"large": torch.empty(3, dtype=torch.int64)}
    g = _grad(5000, 4)
    found = kernels.compensate_scan(g.clone(), None, [5000], 0.5, scratch)
    assert found is not None and found.large is not None
    assert torch.equal(found.large, torch.nonzero(g.abs() >= 0.5).squeeze(1))
    assert kernels.compensate_scan(g.half(), None, [5000], 0.5, {}) is None
    assert kernels.compensate_scan(g[::2], None, [2500], 0.5, {}) is None
    with pytest.raises(ValueError, match="sizes add up to 4000"):
        kernels.compensate_scan(g, None, [4000], 0.5, {})


@needs_numba
def test_fused_compensation_equals_the_unfused_one_with_idle_parameters():
    """Same compensated values, same residuals (kept by swapping buffers), and a skipped
    step leaves the state exactly as it was, with the gradient itself only read."""
    layout = (("a", 3000), ("b", 500), ("c", 2000))
    fused, plain = ErrorFeedback(), ErrorFeedback()
    for step in range(5):
        grad = _grad(5500, 10 + step)
        if step == 2:
            grad[3000:3500] = 0  # "b" unused this step
        a, b = grad.clone(), grad.clone()
        found = compensate_scan(fused, layout, a, 1.0, 1.5, {})
        assert found is not None and found.candidates is not None
        finite, idle, compensated = found.finite, found.idle, found.compensated
        large = found.candidates.indices
        assert finite and idle == (("b",) if step == 2 else ())
        plain.compensate(layout, b, 1.0, keep=idle)
        assert torch.equal(compensated, b)
        assert step == 0 or torch.equal(a, grad)  # with a residual, the gradient is only read
        assert torch.equal(large, torch.nonzero(b.abs() >= 1.5).squeeze(1))
        if step == 3:  # skipped (a peer overflowed): nothing is committed
            continue
        sent = large[::3]
        fused.update(layout, compensated, SparsePayload(sent, compensated[sent], 5500), keep=idle, swap=found.in_spare)
        plain.update(layout, b, SparsePayload(sent, b[sent], 5500), keep=idle)
        for name in ("a", "b", "c"):
            assert torch.equal(fused.residual(name), plain.residual(name)), (step, name)
    assert compensate_scan(ErrorFeedback(momentum=0.9), layout, _grad(5500, 1), 1.0, None, {}) is None


@pytest.mark.parametrize(
    "name,kwargs", [("topk", {"density": 0.01}), ("sampled_topk", {"density": 0.01}), ("threshold", {"threshold": 2.0})]
)
def test_selection_from_the_candidate_hint_is_the_selection_without_it(name, kwargs):
    compressor = C.build(name, **kwargs)
    hinted, plain = CompressorState(name), CompressorState(name)
    for step in range(5):
        x = _grad(300_000, 20 + step) * (1.0 + 0.1 * step)
        expected = compressor.compress(x, plain)
        floor = compressor.candidate_floor(hinted, x, x.__getitem__)
        assert floor is not None and 0 < floor <= float(expected.values.abs().min())
        hinted.large = Candidates(floor, torch.nonzero(x.abs() >= floor).squeeze(1))
        assert hinted.large[1].numel() < 2 * expected.count  # a few more than selected, not many
        got = compressor.compress(x, hinted)
        hinted.large = None
        assert torch.equal(got.indices, expected.indices) and torch.equal(got.values, expected.values)
    # a floor that is too high is only slower: selection reads the tensor again
    hinted.large = Candidates(100.0, torch.empty(0, dtype=torch.int64))
    got = compressor.compress(x, hinted)
    assert torch.equal(got.indices, compressor.compress(x, CompressorState(name)).indices)


def test_compressors_without_a_threshold_have_no_candidate_floor():
    x = _grad(300_000, 5)
    for name in ("randomk", "none", "variance"):
        assert C.build(name).candidate_floor(CompressorState(name), x, lambda positions: x[positions]) is None
    small = _grad(1000, 6)  # sorted outright: no sample, no floor
    assert C.build("topk").candidate_floor(CompressorState("t"), small, lambda positions: small[positions]) is None


@needs_numba
def test_second_residual_buffers_follow_ddp_regrouping():
    """When DDP regroups parameters, the spare buffer of the old grouping goes (no leak)."""
    ef = ErrorFeedback()
    for layout in ((("a", 3000), ("b", 500)), (("b", 500), ("a", 3000)), (("a", 3000),), (("b", 500),)):
        for _ in range(2):
            grad = _grad(sum(n for _, n in layout), 7)
            found = compensate_scan(ef, layout, grad, 1.0, 1.0, {})
            assert found is not None and found.finite and found.candidates is not None
            large, compensated = found.candidates.indices, found.compensated
            ef.update(
                layout, compensated, SparsePayload(large, compensated[large], grad.numel()), keep=found.idle,
                swap=found.in_spare,
            )  # fmt: skip
    assert sorted(ef.memory.spares) == [(("a", 3000),), (("b", 500),)]


@needs_numba
@pytest.mark.parametrize("dtype,index_dtype", [(torch.float32, torch.int32), (torch.float64, torch.int64)])
@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 3])
def test_scatter_sum_is_index_add_bit_for_bit(dtype, index_dtype, scale):
    n = 10_000
    lists = []
    for seed in range(3):  # overlapping lists, one empty
        gen = torch.Generator().manual_seed(seed)
        idx = torch.sort(torch.randperm(n, generator=gen)[: 0 if seed == 1 else 700]).values.to(index_dtype)
        lists.append((idx, torch.randn(idx.numel(), generator=gen).to(dtype)))
    out = torch.full((n,), float("nan"), dtype=dtype)  # whatever was there is overwritten
    assert kernels.scatter_sum(out, lists, scale)
    expected = torch.zeros(n, dtype=dtype)
    for idx, values in lists:
        expected.index_add_(0, idx, values, alpha=scale)
    assert torch.equal(out, expected)


@needs_numba
def test_scatter_sum_into_zeroed_output_adds_to_what_is_there():
    """``zeroed``: the caller zeroed what it reads, so nothing is filled: entries no list
    touches keep their value, and the touched ones get exactly the sum they get otherwise."""
    n = 1000
    idx = [torch.tensor([3, 7, 500], dtype=torch.int32), torch.tensor([7, 999], dtype=torch.int32)]
    lists = [(i, torch.randn(i.numel(), generator=torch.Generator().manual_seed(k))) for k, i in enumerate(idx)]
    out = torch.full((n,), 5.0)
    out[[3, 7, 500, 999]] = 0
    assert kernels.scatter_sum(out, lists, 0.5, zeroed=True)
    expected = torch.zeros(n)
    for i, v in lists:
        expected.index_add_(0, i, v, alpha=0.5)
    touched = torch.zeros(n, dtype=torch.bool)
    touched[[3, 7, 500, 999]] = True
    assert torch.equal(out[touched], expected[touched])
    assert torch.equal(out[~touched], torch.full((n - 4,), 5.0))


@needs_numba
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_scatter_sum_maps_region_positions_into_the_bucket_as_it_adds(index_dtype):
    """``segments``: the same sums at the same bucket entries as mapping the positions
    first (``plan.in_bucket``) and adding there, bit for bit, in ascending order or not."""
    from gradsparse.engine.plan import BucketPlan

    layout = (("a", 500), ("empty", 0), ("b", 300), ("c", 400), ("d", 1))
    offsets = [900, 0, 0, 450, 1400]  # b first, then (after a bias) c, a, and d last
    plan = BucketPlan(layout, offsets, None, small=[(300, 150), (850, 50), (1401, 9)], key="a|empty|b|c|d")
    lists = []
    for seed, shuffled in ((0, False), (1, True), (2, False)):
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(1201, generator=gen)[:400]
        idx = idx if shuffled else torch.sort(idx).values
        idx[:2] = torch.tensor([0, 1200])  # both ends of the region
        lists.append((idx.to(index_dtype), torch.randn(400, generator=gen)))
    expected = torch.zeros(1410)
    for idx, values in lists:
        expected.index_add_(0, plan.in_bucket(idx), values, alpha=0.5)
    out = torch.full((1410,), float("nan"))
    assert kernels.scatter_sum(out, lists, 0.5, segments=plan.region_map(out.device))
    assert torch.equal(out, expected)
    with pytest.raises(IndexError, match=r"outside \[0, 1201\)"):
        kernels.scatter_sum(out, [(torch.tensor([1201]), torch.ones(1))], 1.0, segments=plan.region_map(out.device))


@needs_numba
def test_scatter_sum_refuses_what_it_cannot_do():
    out = torch.zeros(10)
    idx = torch.tensor([1, 2], dtype=torch.int32)
    assert not kernels.scatter_sum(out, [(idx, torch.ones(2, dtype=torch.float16))], 1.0)  # other dtype
    assert not kernels.scatter_sum(out.to(torch.float16), [(idx, torch.ones(2))], 1.0)
    assert not kernels.scatter_sum(out, [(idx, torch.ones(3))], 1.0)  # lengths differ
    with pytest.raises(IndexError, match=r"outside \[0, 10\)"):
        kernels.scatter_sum(out, [(torch.tensor([3, 10], dtype=torch.int32), torch.ones(2))], 1.0)
