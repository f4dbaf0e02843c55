"""The ``sign`` compressor (scaled sign, packed bits), error feedback's ``keep_error``, and
the preconditioner's first moment."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import gradsparse.compressors as C
from gradsparse.compressors.scaled_sign import pack_signs, unpack_signs
from gradsparse.error_feedback import ErrorFeedback, keep_error
from gradsparse.precondition import AdamPreconditioner


def _scaled_signs(values, sizes, block):
    """Each tensor's ``block``-sized runs as sign times mean magnitude (the scale rounded to
    bfloat16, as sent), written out apart from the compressor, in float64."""
    expected, at = torch.empty(values.numel(), dtype=torch.float64), 0
    for size in sizes:
        for start in range(at, at + size, block):
            chunk = values[start : min(start + block, at + size)].double()
            scale = chunk.abs().mean().float().to(torch.bfloat16).double()
            expected[start : start + chunk.numel()] = torch.where(chunk >= 0, 1.0, -1.0) * scale
        at += size
    return expected


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 700), block=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_decoded_values_are_sign_times_the_block_mean(numel, block, seed):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    if numel:
        values[0] = 0.0  # zero counts as positive
    comp = C.build("sign", block=block)
    signs, scales = comp.encode(values)
    assert signs.dtype == torch.uint8 and signs.numel() == (numel + 7) // 8
    assert scales.numel() == comp.blocks(numel).count == -(-numel // block)
    decoded = comp.decode(signs, scales, numel)
    assert scales.dtype == torch.bfloat16
    expected = _scaled_signs(values, [numel], block)
    assert_close(decoded.double(), expected, rtol=4e-3, atol=1e-7)  # one bfloat16 rounding apart at most
    payload = comp.compress(values)
    assert torch.equal(payload.indices.long(), torch.arange(numel)) and torch.equal(payload.values, decoded)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    block=st.integers(1, 64),
    zero=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_blocks_never_straddle_two_tensors(sizes, block, zero, seed):
    numel = sum(sizes)
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    if zero < len(sizes):  # a parameter with no gradient
        start = sum(sizes[:zero])
        values[start : start + sizes[zero]] = 0.0
    comp = C.build("sign", block=block)
    blocks = comp.blocks_of(sizes, values.device)
    signs, scales = comp.encode(values, blocks)
    assert blocks.numel == numel and scales.numel() == blocks.count == sum(-(-n // block) for n in sizes)
    decoded = comp.decode(signs, scales, numel, torch.float32, blocks)
    assert_close(decoded.double(), _scaled_signs(values, sizes, block), rtol=4e-3, atol=1e-7)
    if zero < len(sizes):  # decodes to zeros, not to a neighbour's scale
        start = sum(sizes[:zero])
        assert not decoded[start : start + sizes[zero]].any()
    if all(n % block == 0 for n in [n for n in sizes if n][:-1]):
        assert blocks.ids is None  # the plain runs: the reshaping path


def test_signs_pack_eight_to_a_byte():
    values = torch.tensor([1.0, -1.0, 0.0, -0.0, -3.0, 2.0, -1.0, 5.0, -2.0])
    packed = pack_signs(values)
    # -0.0 < 0 is False: it counts as positive, as 0.0 does
    assert packed.tolist() == [0b10101101, 0b0]
    assert unpack_signs(packed, 9, torch.float32).tolist() == [1, -1, 1, 1, -1, 1, -1, 1, -1]


def test_a_non_finite_entry_makes_its_block_non_finite_and_no_other():
    values = torch.ones(8)
    values[5] = float("nan")
    scales = C.build("sign", block=4).scales(values)
    assert torch.isfinite(scales[0]) and torch.isnan(scales[1])


def test_block_is_validated():
    with pytest.raises(ValueError, match=r"`block` to be an int >= 1, but got 0"):
        C.build("sign", block=0)
    with pytest.raises(ValueError, match="unknown parameter"):
        C.build("sign", density=0.01)


@pytest.mark.parametrize("unless", [None, False, True])
def test_keep_error_keeps_what_the_encoding_lost(unless):
    layout = (("a", 10), ("b", 7))
    ef = ErrorFeedback()
    comp = C.build("sign", block=4)
    gen = torch.Generator().manual_seed(0)
    residual = torch.zeros(17)
    for _ in range(3):
        grad = torch.randn(17, generator=gen)
        compensated = grad.clone()
        ef.compensate(layout, compensated)
        assert_close(compensated, grad + residual)
        sent = comp.compress(compensated).values
        flag = None if unless is None else torch.tensor(unless)
        keep_error(ef, layout, compensated, sent, unless=flag)
        expected = residual if unless else compensated - sent
        got = torch.cat([ef.residual("a"), ef.residual("b")])
        assert torch.equal(got, expected)
        assert_close(got + (0 if unless else sent), residual if unless else compensated)
        residual = got.clone()


def test_keep_error_refuses_momentum_correction():
    with pytest.raises(ValueError, match="momentum correction"):
        keep_error(ErrorFeedback(0.9), (("a", 2),), torch.zeros(2), torch.zeros(2))


def test_first_moment_before_compression_is_the_documented_update_direction():
    """With beta1, the preconditioned gradient is the bias-corrected first moment of the
    normalised gradients, ``m = b1 m + (1 - b1) g / (sqrt(v_hat) + eps)`` (written out here);
    on the first step, exactly AdamW's step at lr 1."""
    gen = torch.Generator().manual_seed(0)
    pre = AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9)
    p = torch.zeros(6, requires_grad=True)
    adam = torch.optim.Adam([p], lr=1.0, betas=(0.9, 0.99), eps=1e-8)
    m, v = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for t in range(1, 5):
        g = torch.randn(6, generator=gen)
        buffer = g.clone()
        pre.apply([("w", 0, 6)], buffer)
        v = 0.99 * v + 0.01 * g.double() ** 2
        m = 0.9 * m + 0.1 * g.double() / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
        assert_close(buffer.double(), m / (1 - 0.9**t), rtol=1e-5, atol=1e-6)
        if t == 1:
            p.grad = g.clone()
            adam.step()
            assert_close(-p.detach(), buffer, rtol=1e-5, atol=1e-6)
    saved = pre.state_dict()
    assert set(saved["first_moments"]) == {"w"} and saved["beta1"] == 0.9
    again = AdamPreconditioner(0.5, 1.0)
    again.load_state_dict(saved)
    assert again.beta1 == 0.9 and torch.equal(again.first_moments["w"], pre.first_moments["w"])


def test_vectors_get_no_first_moment_unless_asked():
    """Parameters of fewer than two dimensions (named in ``vectors``) are normalised only;
    ``vector_first_moment=True`` gives them the first moment too."""
    g = torch.tensor([1.0, -2.0, 3.0, 4.0])
    for flag in (False, True):
        pre = AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9, vector_first_moment=flag)
        for step in range(2):
            buffer = g.clone() * (1 + step)
            pre.apply([("w", 0, 2), ("b", 2, 2)], buffer, vectors={"b"})
        assert set(pre.first_moments) == ({"w", "b"} if flag else {"w"})
        assert pre.state_dict()["vector_first_moment"] is flag


def test_a_parameter_without_a_gradient_keeps_its_moments_and_stays_zero():
    """As AdamW skips a parameter whose gradient is None: no moment decays, nothing sent."""
    pre = AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9)
    grad = torch.randn(6, generator=torch.Generator().manual_seed(3))
    pre.apply([("w", 0, 6)], grad.clone())
    m, v = pre.first_moments["w"].clone(), pre.second_moments["w"].clone()
    idle = torch.zeros(6)
    pre.apply([("w", 0, 6)], idle)
    assert not idle.any()  # nothing to send
    assert torch.equal(pre.first_moments["w"], m) and torch.equal(pre.second_moments["w"], v)
    used = grad.clone()
    pre.apply([("w", 0, 6)], used)  # a gradient again: the moments move on from where they were
    assert not torch.equal(pre.first_moments["w"], m) and used.any()


def test_idle_tensors_are_the_all_zero_ones_and_a_nan_is_not_zero():
    comp = C.build("sign", block=4)
    sizes = [6, 3, 8, 5]
    blocks = comp.blocks_of(sizes, torch.device("cpu"))
    grads = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(2))
    grads[6:9] = 0.0  # the second tensor received no gradient
    grads[9:17] = 0.0
    grads[12] = float("nan")  # the third: zeros and a NaN, which must reach the sum
    idle = comp.idle_tensors(grads, blocks)
    assert idle.tolist() == [False, True, False, False]
    _, scales = comp.encode(grads, blocks, idle)
    held = blocks.owners == 1
    assert not scales[held].any() and torch.isnan(scales[blocks.owners == 2]).any()
    assert comp.idle_tensors(torch.zeros(5), comp.blocks(5)).tolist() == [True]


def _quantised(values, sizes, block, bits):
    """Each tensor's ``block``-sized runs as the nearest of the levels -L..L times the run's
    largest magnitude over L (rounded to bfloat16, as sent), written out apart."""
    levels, expected, at = 2 ** (bits - 1) - 1, torch.empty(values.numel(), dtype=torch.float64), 0
    for size in sizes:
        for start in range(at, at + size, block):
            chunk = values[start : min(start + block, at + size)]
            scale = (chunk.abs().max() / levels).to(torch.bfloat16).float()
            level = (chunk / scale).round().clamp(-levels, levels) if scale > 0 else torch.zeros_like(chunk)
            expected[start : start + chunk.numel()] = level.double() * scale.double()
        at += size
    return expected


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    block=st.integers(1, 64),
    bits=st.sampled_from([2, 4, 8]),
    zero=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_quantize_decodes_to_the_nearest_level_of_each_blocks_peak(sizes, block, bits, zero, seed):
    numel = sum(sizes)
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    if zero < len(sizes):  # a tensor of zeros decodes to zeros
        values[sum(sizes[:zero]) : sum(sizes[: zero + 1])] = 0.0
    comp = C.build("quantize", bits=bits, block=block)
    for blocks in (None, comp.blocks_of(sizes, values.device)) if len(sizes) > 1 else (None,):
        codes, scales = comp.encode(values, blocks)
        assert codes.dtype == torch.uint8 and codes.numel() == comp.packed_bytes(numel) == -(-numel * bits // 8)
        decoded = comp.decode(codes, scales, numel, torch.float32, blocks)
        expected = _quantised(values, sizes if blocks is not None else [numel], block, bits)
        assert torch.equal(decoded.double(), expected)  # the same float32 ops: the same bits
        if numel:  # no error is over a level of the largest scale (half a level, and bfloat16's rounding)
            assert ((values - decoded).abs() <= values.abs().max() / (2 ** (bits - 1) - 1) + 1e-6).all()


def test_quantize_codes_and_validation():
    comp = C.build("quantize", bits=2, block=4)  # ternary: -1, 0, +1 times max/1
    codes, scales = comp.encode(torch.tensor([4.0, -4.0, 1.0, 3.0, 0.0]))
    assert comp.decode(codes, scales, 5).tolist() == [4.0, -4.0, 0.0, 4.0, 0.0]
    values = torch.ones(8)
    values[5] = float("nan")
    scales = C.build("quantize", block=4).scales(values)
    assert torch.isfinite(scales[0]) and torch.isnan(scales[1])
    assert C.build("quantize", bits=4.0).bits == 4  # a command line's float
    with pytest.raises(ValueError, match=r"`bits` to be one of \[2, 4, 8\], but got 3"):
        C.build("quantize", bits=3)
