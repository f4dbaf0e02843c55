"""SparseAdamW and the preconditioner: validation at the boundary, and the division."""

from __future__ import annotations

import io

import pytest
import torch
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.precondition import AdamPreconditioner


def test_sparse_adamw_refuses_what_it_cannot_use():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="`hook` to be the SparseHookState"):
        gs.optim.SparseAdamW(params, hook=object())  # type: ignore[arg-type]
    state = gs.SparseHookState("topk")
    with pytest.raises(ValueError, match=r"`betas` to be a pair"):
        gs.optim.SparseAdamW(params, betas=(0.9,), hook=state)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`lr`"):
        gs.optim.SparseAdamW(params, lr=-1.0, hook=state)
    with pytest.raises(ValueError, match=r"`second_moment`.*'averaged', 'local'.*'global'"):
        gs.optim.SparseAdamW(params, hook=state, second_moment="global")
    with pytest.raises(ValueError, match=r"`dense_steps` to be an int >= 0, but got -1"):
        gs.optim.SparseAdamW(params, hook=state, dense_steps=-1)
    with pytest.raises(ValueError, match="`eps`"):
        AdamPreconditioner(0.999, 0.0)
    assert state.preconditioner is None  # nothing installed by a refused optimizer


def test_preconditioner_divides_each_named_span_by_its_own_bias_corrected_root():
    pre = AdamPreconditioner(beta2=0.9, eps=1e-8)
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    buffer = torch.cat([a, b])
    pre.apply([("a", 0, 5), ("b", 5, 3)], buffer)
    assert_close(buffer, torch.cat([a / (a.abs() + 1e-8), b / (b.abs() + 1e-8)]))
    a2 = torch.randn(5, dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    buffer = torch.cat([a2, zero])
    pre.apply([("a", 0, 5), ("b", 5, 3)], buffer)
    v = 0.9 * 0.1 * a * a + 0.1 * a2 * a2
    assert_close(buffer[:5], a2 / ((v / (1 - 0.9**2)).sqrt() + 1e-8))
    assert torch.equal(buffer[5:], zero)  # no gradient: still none


def test_averaged_second_moment_is_the_documented_estimate_written_out():
    """With ``ranks`` P and a first moment, what is sent is ``m_hat / sqrt(f)``,
    ``f = min(1, 1/P + (1 - 1/P) m_hat**2)`` (module docstring), written out here; one rank,
    or ``averaged_second_moment=False``, sends ``m_hat`` itself."""
    gen = torch.Generator().manual_seed(0)
    pres = {
        (4, True): AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9),
        (1, True): AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9),
        (4, False): AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9, averaged_second_moment=False),
    }
    m, v = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    for t in range(1, 30):
        g = torch.randn(50, generator=gen) + torch.linspace(-3, 3, 50)  # steady and noisy coordinates
        v = 0.99 * v + 0.01 * g.double() ** 2
        m = 0.9 * m + 0.1 * g.double() / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
        m_hat = m / (1 - 0.9**t)
        f = (0.25 + 0.75 * m_hat**2).clamp(max=1.0)
        for (ranks, averaged), pre in pres.items():
            buffer = g.clone()
            pre.apply([("w", 0, 50)], buffer, ranks=ranks)
            expected = m_hat / f.sqrt() if ranks > 1 and averaged else m_hat
            assert_close(buffer.double(), expected, rtol=1e-5, atol=1e-6)
    assert pres[(4, True)].state_dict()["averaged_second_moment"] is True
    again = AdamPreconditioner(0.5, 1.0)
    again.load_state_dict({**pres[(4, True)].state_dict(), "averaged_second_moment": False})
    assert again.averaged_second_moment is False
    old = {k: v for k, v in pres[(4, True)].state_dict().items() if k != "averaged_second_moment"}  # saved before
    for built in (True, False):  # it existed: the choice this preconditioner was built with stays
        fresh = AdamPreconditioner(0.5, 1.0, averaged_second_moment=built)
        fresh.load_state_dict(old)
        assert fresh.averaged_second_moment is built
        assert torch.equal(fresh.second_moments["w"], pres[(4, True)].second_moments["w"])


def test_averaged_second_moment_keeps_steady_gradients_and_scales_noise_by_the_rank_count():
    """The two limits: a constant gradient is sent as Adam's unit step whatever P; pure noise
    gets the averaged gradient's smaller second moment, so a larger step (sqrt(P) at most)."""
    pre = AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9)
    steady = torch.tensor([0.5, -2.0, 3.0])
    for _ in range(20):
        buffer = steady.clone()
        pre.apply([("w", 0, 3)], buffer, ranks=8)
        assert_close(buffer, steady.sign())
    gen = torch.Generator().manual_seed(1)
    noise = {P: AdamPreconditioner(beta2=0.99, eps=1e-8, beta1=0.9) for P in (1, 4)}
    ratios = []
    for t in range(400):
        g = torch.randn(20000, generator=gen, dtype=torch.float64)
        sent = {}
        for P, p in noise.items():
            sent[P] = g.clone()
            p.apply([("w", 0, 20000)], sent[P], ranks=P)
        if t >= 200:
            ratios.append(float(sent[4].norm() / sent[1].norm()))
    # m_hat of pure noise is about normal with variance s2 = (1 - b1) / (1 + b1); the norm
    # ratio squared is the m_hat**2-weighted mean of 1/f, at least 1 / (1/4 + 3/4 * 3 s2)
    s2 = 0.1 / 1.9
    assert (0.25 + 0.75 * 3 * s2) ** -0.5 - 0.02 <= sum(ratios) / len(ratios) <= 2.0
    assert max(ratios) <= 2.0 + 1e-9  # never more than sqrt(P)


def test_integrations_warn_about_an_adaptive_optimizer_without_the_preconditioner(caplog):
    from gradsparse.integrations._registration import HookOnModel

    params = [torch.nn.Parameter(torch.zeros(3))]
    on_model = HookOnModel(state=gs.SparseHookState("topk"))
    with caplog.at_level("WARNING"):
        assert on_model.check_optimizers([torch.optim.AdamW(params)])
    assert "AdamW on sparse gradients ends worse" in caplog.text and "docs/optimizers.md" in caplog.text
    assert "gradsparse.optim.SparseAdamW" in caplog.text and "'sign' compressor" in caplog.text
    assert not on_model.check_optimizers([torch.optim.SGD(params, lr=0.1)])
    assert on_model.state is not None
    gs.optim.SparseAdamW(params, hook=on_model.state)
    assert not on_model.check_optimizers([torch.optim.AdamW(params)])  # SparseAdamW: its docs say it


def _steps(opt: gs.optim.SparseAdamW, hook: gs.SparseHookState, lrs: list, first: int = 0) -> list:
    """Optimizer steps at these learning rates, from step ``first``, after the hook counted
    each step (as the hook does in backward, before the optimizer steps); how the hook sent
    each step: "dense", "signs" (its sign warm-up) or "sparse"."""
    sent = []
    for t, lr in enumerate(lrs, start=first):
        options = hook.options  # the hook's decision for step t
        signs_end = options.start_step + options.sign_warmup_steps
        sent.append("dense" if t < options.start_step else "signs" if t < signs_end else "sparse")
        for group in opt.param_groups:
            group["lr"] = lr
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        hook.step = t + 1
        opt.step()
    return sent


def _warm_up(hook):
    return hook.options.start_step, hook.options.sign_warmup_steps, hook.options.density_warmup_steps


#: a one-cycle-like schedule: the learning rate rises over steps 0-79, then falls
RISING = [max(min(t + 1, 160 - t), 1) * 1e-3 for t in range(600)]


def test_with_top_k_sparse_adamw_warms_the_hook_up_in_signs_that_follow_the_schedule(caplog):
    params = [torch.nn.Parameter(torch.zeros(3))]
    rising = gs.SparseHookState("topk")
    with caplog.at_level("INFO", logger="gradsparse.optim"):
        opt = gs.optim.SparseAdamW(params, hook=rising)
        assert _warm_up(rising) == (0, gs.optim.DENSE_STEPS, 0) == (0, 50, 0)
        assert "sends the first 50 steps as 1-bit signs, and then while the learning rate rises" in caplog.text
        sent = _steps(opt, rising, RISING)
    # the schedule's warm-up and its peak (81 steps), then SIGN_STEPS times as many: 7 x 81
    assert _warm_up(rising) == (0, (1 + gs.optim.SIGN_STEPS) * 81, 0) == (0, 567, 0)
    assert rising.policy.options.sign_warmup_steps == 567 and sent == ["signs"] * 567 + ["sparse"] * 33
    assert "the learning rate rose for 81 steps of signs" in caplog.text
    assert "the hook sends steps 0 to 566 as 1-bit signs, and topk from step 567" in caplog.text
    constant = gs.SparseHookState("topk")
    _steps(gs.optim.SparseAdamW(params, hook=constant), constant, [1e-3] * 100)
    assert _warm_up(constant) == (0, 350, 0)  # no schedule's warm-up: the fewest 50, then 6 x 50
    exact = gs.SparseHookState("topk")
    _steps(gs.optim.SparseAdamW(params, hook=exact, sign_steps=30), exact, RISING[:100])
    assert _warm_up(exact) == (0, 30, 0)  # that many, whatever the learning rate does
    own = gs.SparseHookState("topk", start_step=60)  # the hook's own dense steps, then the signs
    _steps(gs.optim.SparseAdamW(params, hook=own), own, RISING[:200])
    assert _warm_up(own) == (60, 350, 0)  # 50 signs from step 60 outlast the schedule's rise: 7 x 50
    for every_entry in ("sign", "quantize", "none"):  # nothing is held back for long: no warm-up
        state = gs.SparseHookState(every_entry)
        _steps(gs.optim.SparseAdamW(params, hook=state), state, [t * 1e-3 for t in range(10)])
        assert _warm_up(state) == (0, 0, 0)


def test_where_signs_cannot_or_should_not_be_sent_the_warm_up_is_dense(caplog):
    params = [torch.nn.Parameter(torch.zeros(3))]
    for hook, kwargs in (
        (gs.SparseHookState("threshold"), {}),  # no density budget
        (gs.SparseHookState("topk", momentum=0.9), {}),  # DGC's momentum correction
        (gs.SparseHookState("topk"), {"sign_steps": 0}),  # asked for none
    ):
        with caplog.at_level("INFO", logger="gradsparse.optim"):
            opt = gs.optim.SparseAdamW(params, hook=hook, **kwargs)
            assert "sends the first 50 steps dense, and then while the learning rate rises" in caplog.text
            sent = _steps(opt, hook, RISING[:100])
        assert _warm_up(hook) == (81, 0, 0) and sent == ["dense"] * 81 + ["sparse"] * 19, kwargs
        assert "warm-up over after 81 dense steps" in caplog.text
        caplog.clear()
    constant = gs.SparseHookState("threshold")
    _steps(gs.optim.SparseAdamW(params, hook=constant), constant, [1e-3] * 100)
    assert _warm_up(constant) == (50, 0, 0)
    fixed = gs.SparseHookState(gs.compressors.build("randomk", density=0.005))
    _steps(gs.optim.SparseAdamW(params, hook=fixed, dense_steps=20), fixed, RISING[:100])
    assert _warm_up(fixed) == (20, 120, 0)  # that many dense, then 6 x as many signs
    chosen = gs.SparseHookState("topk")
    gs.optim.SparseAdamW(params, hook=chosen, dense_steps=20, sign_steps=7)
    assert _warm_up(chosen) == (20, 7, 0)
    later = gs.SparseHookState("sampled_topk", start_step=500)
    gs.optim.SparseAdamW(params, hook=later, dense_steps=20)
    assert later.options.start_step == 500  # the hook's own, later start stays
    off = gs.SparseHookState("topk")
    _steps(gs.optim.SparseAdamW(params, hook=off, dense_steps=0), off, [t * 1e-3 for t in range(10)])
    assert _warm_up(off) == (0, 0, 0)


@pytest.mark.parametrize("compressor", ["topk", "threshold"])
def test_the_warm_up_resumed_from_a_checkpoint_goes_on_as_it_would_have(compressor):
    straight = gs.SparseHookState(compressor)
    expected = _steps(gs.optim.SparseAdamW([torch.nn.Parameter(torch.zeros(3))], hook=straight), straight, RISING)
    if compressor == "topk":
        assert expected == ["signs"] * 567 + ["sparse"] * 33
    else:
        assert expected == ["dense"] * 81 + ["sparse"] * 519
    for cut in (30, 65, 100, 570):  # in the fewest steps, in the schedule's warm-up, after it, after all
        first = gs.SparseHookState(compressor)
        opt = gs.optim.SparseAdamW([torch.nn.Parameter(torch.zeros(3))], hook=first)
        before = _steps(opt, first, RISING[:cut])
        saved = io.BytesIO()
        torch.save({"hook": first.state_dict(), "opt": opt.state_dict()}, saved)
        loaded = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
        again = gs.SparseHookState(compressor)
        resumed = gs.optim.SparseAdamW([torch.nn.Parameter(torch.zeros(3))], hook=again)
        again.load_state_dict(loaded["hook"])
        resumed.load_state_dict(loaded["opt"])
        assert before + _steps(resumed, again, RISING[cut:], first=cut) == expected, cut


def test_the_sign_warm_up_is_saved_and_checked():
    params = [torch.nn.Parameter(torch.zeros(3))]
    own = gs.SparseHookState(gs.compressors.build("topk", density=0.001), sign_warmup_steps=900)
    _steps(gs.optim.SparseAdamW(params, hook=own), own, RISING[:120])
    assert _warm_up(own) == (0, 900, 0)  # the hook's own, longer sign warm-up stays
    saved = io.BytesIO()
    torch.save(own.state_dict(), saved)
    again = gs.SparseHookState(gs.compressors.build("topk", density=0.001))
    again.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    assert _warm_up(again) == (0, 900, 0) and again.policy.options.sign_warmup_steps == 900
    with pytest.raises(ValueError, match="`sign_warmup_steps` needs a density-based compressor"):
        gs.SparseHookState("threshold").warm_up(10, signs=20)
    with pytest.raises(ValueError, match="`density_warmup_steps` needs a density-based compressor"):
        gs.SparseHookState("threshold").warm_up(10, 20)
    with pytest.raises(ValueError, match="`sign_warmup_steps` needs `momentum=0`"):
        gs.SparseHookState("topk", momentum=0.9, sign_warmup_steps=5)
    with pytest.raises(ValueError, match="`sign_steps`"):
        gs.optim.SparseAdamW(params, sign_steps=-1)


def test_a_density_ramp_begins_after_the_sign_warm_up():
    hook = gs.SparseHookState(
        gs.compressors.build("topk", density=0.001), start_step=10, sign_warmup_steps=20, density_warmup_steps=100
    )
    densities = [float(hook.policy.compressor_at(t).density) for t in (10, 29, 30, 80, 130, 500)]
    assert densities[0] == densities[1] == densities[2] == 0.25 > densities[3] > densities[4] == densities[5] == 0.001


def test_sparse_adamw_built_without_its_hook_is_attached_once_before_stepping():
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3))]
    opt = gs.optim.SparseAdamW(params, lr=0.1, betas=(0.8, 0.95), eps=1e-6)
    params[0].grad = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="stepped before a SparseHookState was attached"):
        opt.step()  # it would apply raw gradients as Adam's update direction
    state = gs.SparseHookState("sign")
    opt.attach(state)
    pre = state.preconditioner
    assert pre is not None and (pre.beta1, pre.beta2, pre.eps) == (0.8, 0.95, 1e-6)
    opt.attach(state)  # a second fit: the same moments stay
    assert state.preconditioner is pre
    with pytest.raises(ValueError, match="attached to another SparseHookState"):
        opt.attach(gs.SparseHookState("sign"))
    with pytest.raises(ValueError, match="`hook` to be the SparseHookState"):
        gs.optim.SparseAdamW(params).attach(object())  # type: ignore[arg-type]
    groups = [{"params": params[:1], "eps": 1e-6}, {"params": params[1:], "eps": 1e-8}]
    with pytest.raises(ValueError, match=r"the same `eps`.*\[1e-08, 1e-06\]"):
        gs.optim.SparseAdamW(groups)  # refused when built, not when an integration attaches it
    opt.step()  # the gradient is the update direction: -lr times it (weight decay of zeros is zero)
    assert torch.equal(params[0], torch.full((2, 3), -0.1)) and not params[1].any()


def test_integrations_attach_sparse_adamw_and_refuse_clipping_with_it():
    from gradsparse.integrations._registration import HookOnModel

    params = [torch.nn.Parameter(torch.zeros(3))]
    on_model = HookOnModel(state=gs.SparseHookState("sign"))
    opt = gs.optim.SparseAdamW(params)
    with pytest.raises(ValueError, match=r"gradient_clip_val=1\.0 would clip SparseAdamW's update direction"):
        on_model.check_optimizers([opt], "gradient_clip_val=1.0")
    assert opt.hook is None and on_model.state is not None and on_model.state.preconditioner is None
    assert not on_model.check_optimizers([opt])  # attached: nothing to warn about
    assert opt.hook is on_model.state and on_model.state.preconditioner is not None
