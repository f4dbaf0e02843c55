"""Resharding the hook's state to another number of ranks preserves, per parameter, the
mean residual over the ranks (what the next updates receive)."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.reshard import shares


def _states(world, sizes, seed, momentum=False, scales=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        state = gs.SparseHookState("topk", momentum=0.9 if momentum else 0.0).state_dict()
        names = {f"p{i}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
        state["error_feedback"] = {"residuals": names, "scales": {n: (scales or [1.0] * world)[r] for n in names}}
        if momentum:
            state["error_feedback"]["velocity"] = {n: torch.randn(t.shape, generator=gen) for n, t in names.items()}
        state["step"] = 7
        state["stats"]["bytes_sent"] = 1000 * (r + 1)
        out.append(state)
    return out


def _mean(states, store, name, scale=1.0):
    tensors = [s["error_feedback"][store][name].double() / s["error_feedback"]["scales"][name] for s in states]
    return torch.stack(tensors).mean(0) * scale


@settings(max_examples=60, deadline=None)
@given(
    old=st.integers(1, 7),
    new=st.integers(1, 7),
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=3),
    momentum=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_the_mean_over_ranks_is_preserved_for_every_parameter(old, new, sizes, momentum, seed):
    before = _states(old, sizes, seed, momentum)
    after = gs.reshard_states(before, new)
    assert len(after) == new
    for store in ("residuals", "velocity") if momentum else ("residuals",):
        for name in before[0]["error_feedback"][store]:
            assert_close(_mean(after, store, name), _mean(before, store, name), rtol=1e-6, atol=1e-6)
    assert all(s["step"] == 7 for s in after)


def test_blocks_keep_each_ranks_residual_together():
    before = _states(2, [5], seed=1)
    r0, r1 = (s["error_feedback"]["residuals"]["p0"] for s in before)
    wider = gs.reshard_states(before, 4)  # each old rank's residual on two new ranks, whole
    got = [s["error_feedback"]["residuals"]["p0"] for s in wider]
    for g, expected in zip(got, [r0, r0, r1, r1]):
        assert torch.equal(g, expected)
    narrower = gs.reshard_states(_states(4, [5], seed=2), 2)  # two old ranks per new rank, averaged
    quads = [s["error_feedback"]["residuals"]["p0"] for s in _states(4, [5], seed=2)]
    assert_close(narrower[0]["error_feedback"]["residuals"]["p0"], (quads[0] + quads[1]) / 2)
    assert [sum(row) for row in shares(3, 5)] == [1, 1, 1]


def test_states_in_other_loss_scales_are_brought_to_one():
    before = _states(2, [4], seed=3, scales=[2.0**10, 2.0**11])
    after = gs.reshard_states(before, 3)
    assert all(s["error_feedback"]["scales"]["p0"] == 2.0**10 for s in after)
    assert_close(_mean(after, "residuals", "p0"), _mean(before, "residuals", "p0"))


def test_per_coordinate_statistics_are_reset_with_a_warning(caplog):
    states = []
    for r in range(2):
        s = gs.SparseHookState("variance").state_dict()
        s["compressor_buffers"] = {"mean": {"p0": torch.ones(3) * r}, "var": {"p0": torch.ones(3)}}
        s["compressor_scalars"] = {"p0": {"observations": 5.0}}
        states.append(s)
    with caplog.at_level(logging.WARNING, logger="gradsparse.reshard"):
        after = gs.reshard_states(states, 3)
    assert "resets the 'variance' compressor's per-coordinate statistics" in caplog.text
    assert all(s["compressor_buffers"]["mean"] == {} and s["compressor_scalars"] == {} for s in after)
    restored = gs.SparseHookState("variance")
    restored.load_state_dict(after[2])  # loads as any state_dict does


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one rank"):
        gs.reshard_states([], 2)
    states = _states(2, [3], seed=4)
    states[1]["step"] = 8
    with pytest.raises(ValueError, match="disagree on `step`"):
        gs.reshard_states(states, 3)
    with pytest.raises(ValueError, match="world_size"):
        gs.reshard_states(_states(2, [3], seed=4), 0)
    with pytest.raises(ValueError, match="not a SparseHookState state_dict"):
        gs.reshard_states([{"format": "x"}], 2)


def test_the_preconditioners_second_moments_come_from_the_covering_rank_and_load():
    old = _states(2, [6], seed=3)
    for r, state in enumerate(old):
        state["preconditioner"] = {
            "beta2": 0.99, "eps": 1e-8, "second_moments": {"p0": torch.full((6,), float(r + 1))}, "steps": {"p0": 7},
        }  # fmt: skip
    new = gs.reshard_states(old, 4)  # new ranks 0, 1 lie in old rank 0's half; 2, 3 in old rank 1's
    assert [float(s["preconditioner"]["second_moments"]["p0"][0]) for s in new] == [1.0, 1.0, 2.0, 2.0]
    restored = gs.SparseHookState("topk")
    restored.load_state_dict(new[3])
    assert restored.preconditioner is not None and restored.preconditioner.beta2 == 0.99
    assert torch.equal(restored.preconditioner.second_moments["p0"], torch.full((6,), 2.0))
    assert restored.preconditioner.steps == {"p0": 7}


def test_the_preconditioners_first_moments_come_from_the_covering_rank_and_load():
    """SparseAdamW's local first moment (and its settings) travel with the second moment;
    a state saved before the first moment lived in the hook loads without one."""
    old = _states(2, [6], seed=3)
    for r, state in enumerate(old):
        state["preconditioner"] = {
            "beta1": 0.9, "vector_first_moment": False, "beta2": 0.99, "eps": 1e-8,
            "first_moments": {"p0": torch.full((6,), -float(r + 1))},
            "second_moments": {"p0": torch.full((6,), float(r + 1))}, "steps": {"p0": 7},
        }  # fmt: skip
    new = gs.reshard_states(old, 4)
    assert [float(s["preconditioner"]["first_moments"]["p0"][0]) for s in new] == [-1.0, -1.0, -2.0, -2.0]
    restored = gs.SparseHookState("topk")
    restored.load_state_dict(new[2])
    pre = restored.preconditioner
    assert pre is not None and pre.beta1 == 0.9 and pre.vector_first_moment is False
    assert torch.equal(pre.first_moments["p0"], torch.full((6,), -2.0))
    saved_before = dict(new[0])
    saved_before["preconditioner"] = {
        k: v for k, v in new[0]["preconditioner"].items() if k not in ("first_moments", "beta1", "vector_first_moment")
    }
    older = gs.SparseHookState("topk")
    older.load_state_dict(saved_before)
    assert older.preconditioner is not None and older.preconditioner.beta1 == 0.0
    assert older.preconditioner.first_moments == {}


def test_the_warm_up_travels_and_loads():
    """SparseAdamW's warm-up (dense steps, sign warm-up, ramp) is the same on every rank and
    goes on, after resharding, where it was."""
    before = _states(2, [5], seed=3)
    for state in before:
        state.update(start_step=20, sign_warmup_steps=427, density_warmup_steps=0)
    for state in gs.reshard_states(before, 3):
        hook = gs.SparseHookState("topk")
        hook.load_state_dict(state)
        assert (hook.options.start_step, hook.options.sign_warmup_steps) == (20, 427)
        assert hook.policy.options.sign_warmup_steps == 427
