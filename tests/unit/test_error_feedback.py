import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gradsparse import compressors as C
from gradsparse.compressors import CompressorState
from gradsparse.error_feedback import ErrorFeedback
from gradsparse.store import ParamStore

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _compressor(name, density):
    if name == "threshold":
        return C.build("threshold", threshold=1.0 - density)
    if name == "variance":
        return C.build("variance", alpha=density)
    if name == "none":
        return C.build("none")
    return C.build(name, density=density)


@settings(max_examples=60, deadline=None)
@given(
    # the selecting compressors (``sign`` encodes every entry: tests/unit/test_sign.py)
    name=st.sampled_from([n for n in C.available() if C.registry.get(n).route is None]),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    density=st.floats(0.01, 1.0),
    dtype=st.sampled_from(DTYPES),
    momentum=st.sampled_from([0.0, 0.9]),
    scale=st.sampled_from([1.0, 2.0**-3, 2.0**16]),
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 4),
)
def test_sent_plus_residual_equals_compensated_exactly(name, sizes, density, dtype, momentum, scale, seed, steps):
    """Conservation: at every step, the densified payload + new residual equals the
    compensated gradient bit for bit, for every compressor."""
    comp = _compressor(name, density)
    ef = ErrorFeedback(momentum)
    layout = tuple((f"p{i}", n) for i, n in enumerate(sizes))
    numel = sum(sizes)
    buffers = {b: ParamStore() for b in comp.state_buffers}
    cstate = CompressorState(key="bucket")
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grad = (torch.randn(numel, generator=gen) * scale).to(dtype)
        cstate.step = step
        cstate.buffers = {b: s.flat(layout, grad) for b, s in buffers.items()}
        comp.observe(grad, cstate)
        assume(bool(torch.isfinite(grad).all()))  # the hook never compresses non-finite buckets
        work = grad.clone()
        velocity = ef.compensate(layout, work, scale)
        compensated = work.clone()
        assume(bool(torch.isfinite(compensated).all()))
        payload = comp.compress(work, cstate)
        ef.update(layout, work, payload, scale, velocity)
        residual = ef.residuals.flat(layout, work)
        sent = payload.to_dense()
        assert torch.equal(sent + residual, compensated)
        assert bool((sent[payload.indices.long()] == compensated[payload.indices.long()]).all())


def test_residual_without_momentum_is_what_was_not_sent():
    ef = ErrorFeedback()
    layout = (("w", 4),)
    g = torch.tensor([1.0, -5.0, 0.5, 2.0])
    ef.compensate(layout, g)
    payload = C.build("topk", density=0.25).compress(g)
    ef.update(layout, g, payload)
    assert ef.residual("w").tolist() == [1.0, 0.0, 0.5, 2.0]
    g2 = torch.tensor([1.0, 1.0, 1.0, 1.0])
    ef.compensate(layout, g2)
    assert g2.tolist() == [2.0, 1.0, 1.5, 3.0]


def test_momentum_correction_masks_sent_coordinates():
    ef = ErrorFeedback(momentum=0.5)
    layout = (("w", 3),)
    g = torch.tensor([4.0, 1.0, 2.0])
    velocity = ef.compensate(layout, g)  # u = g, v = u
    assert ef.velocity.tensors["w"].tolist() == [0.0, 0.0, 0.0]  # nothing committed yet
    payload = C.build("topk", density=0.3).compress(g)
    ef.update(layout, g, payload, 1.0, velocity)
    assert ef.velocity.tensors["w"].tolist() == [0.0, 1.0, 2.0]
    assert ef.residual("w").tolist() == [0.0, 1.0, 2.0]
    g2 = torch.tensor([2.0, 2.0, 2.0])
    ef.compensate(layout, g2)  # u = 0.5u + g ; v += u
    assert g2.tolist() == [2.0, 1.0 + 2.5, 2.0 + 3.0]


def test_state_is_keyed_by_name_across_regrouping():
    """DDP may regroup parameters into other buckets: residuals follow the names."""
    store = ParamStore()
    a = store.flat((("a", 2), ("b", 3)), torch.zeros(1))
    a.copy_(torch.arange(5.0))
    regrouped = store.flat((("b", 3),), torch.zeros(1))
    assert regrouped.tolist() == [2.0, 3.0, 4.0]
    regrouped.add_(10)
    again = store.flat((("b", 3), ("a", 2)), torch.zeros(1))
    assert again.tolist() == [12.0, 13.0, 14.0, 0.0, 1.0]


def test_state_dict_round_trip_and_shape_mismatch():
    ef = ErrorFeedback(momentum=0.9)
    layout = (("w", 3),)
    g = torch.tensor([1.0, 2.0, 3.0])
    velocity = ef.compensate(layout, g)
    ef.update(layout, g, C.build("topk", density=0.3).compress(g), 1.0, velocity)
    other = ErrorFeedback(momentum=0.9)
    other.load_state_dict(ef.state_dict())
    assert torch.equal(other.residuals.flat(layout, g), ef.residuals.flat(layout, g))
    assert torch.equal(other.velocity.flat(layout, g), ef.velocity.flat(layout, g))
    with pytest.raises(ValueError, match="another model"):
        other.residuals.flat((("w", 4),), g)


def test_loss_scale_change_rescales_state_exactly():
    """A residual kept at scale 2**16 and used at 2**15 equals the residual of an unscaled
    run times 2**15: AMP's backoff does not distort error feedback."""
    layout = (("w", 4),)
    comp = C.build("topk", density=0.25)
    g1, g2 = torch.tensor([1.0, -4.0, 0.5, 2.0]), torch.tensor([0.25, 1.0, 1.0, -1.0])
    plain, scaled = ErrorFeedback(momentum=0.5), ErrorFeedback(momentum=0.5)
    for ef, s1, s2 in ((plain, 1.0, 1.0), (scaled, 2.0**16, 2.0**15)):
        a = g1 * s1
        velocity = ef.compensate(layout, a, s1)
        ef.update(layout, a, comp.compress(a), s1, velocity)
        b = g2 * s2
        ef.compensate(layout, b, s2)
        if ef is plain:
            expected = b * 2.0**15
        else:
            assert torch.equal(b, expected)
