"""SparseAdamW with the hook's preconditioner on real gloo ranks. Workers return what they
saw (their own gradients, computed apart from DDP, and the results); every check is made
here, in the parent, against a reference of the algorithm written out below."""

from __future__ import annotations

import io
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.compressors import k_for_density

from .harness import flat_params, run_distributed
from .test_ddp_hook import loss_of, make_model

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-8, 0.1


def _train(
    rank: int,
    world: int,
    compressor: str,
    density: float,
    steps: int,
    first_moment: str = "local",
    dense_steps: int = 0,
) -> Dict[str, Any]:
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    options: Dict[str, Any] = {"density": density} if compressor == "topk" else {}
    if compressor == "sign":
        options["block"] = 64  # both compressed parameters (1280, 4096 entries) are whole blocks
    state = gs.register_sparse_hook(ddp, compressor, scope="layer", min_compress_numel=1000, **options)
    opt = gs.optim.SparseAdamW(
        ddp.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, hook=state, first_moment=first_moment,
        dense_steps=dense_steps,
    )  # fmt: skip
    local_grads: List[Dict[str, torch.Tensor]] = []
    first: Dict[str, Any] = {}
    held: List[float] = []  # what error feedback held after each step
    for step in range(steps):
        local = make_model()
        local.load_state_dict(model.state_dict())
        loss_of(local, rank, step).backward()
        local_grads.append({n: p.grad.clone() for n, p in local.named_parameters()})
        opt.zero_grad()
        loss_of(ddp, rank, step).backward()
        if step == 0:
            first["averaged"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            first["residual"] = {n: state.feedback.residual(n).clone() for n in state.feedback.names()}
        opt.step()
        held.append(sum(float(state.feedback.residual(n).abs().sum()) for n in state.feedback.names()))
        if step + 1 == dense_steps:
            first["warmed"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    restored = gs.SparseHookState(gs.compressors.build(compressor, **options))
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert restored.preconditioner is not None and state.preconditioner is not None
    saved, again = state.preconditioner, restored.preconditioner
    same = all(torch.equal(again.second_moments[n], v) for n, v in saved.second_moments.items())
    same &= again.beta1 == saved.beta1 and set(again.first_moments) == set(saved.first_moments)
    same &= all(torch.equal(again.first_moments[n], m) for n, m in saved.first_moments.items())
    same &= bool(saved.first_moments) == (first_moment == "local")
    dist.barrier()
    return {
        "params": flat_params(model),
        "named": {n: p.detach().clone() for n, p in model.named_parameters()},
        "init": {n: p.detach().clone() for n, p in make_model().named_parameters()},
        "local": local_grads,
        "restored_same": same,
        "held": held,
        **first,
    }


def _reference(results: List[Dict[str, Any]], steps: int, first_moment: str = "global") -> Dict[str, torch.Tensor]:
    """SparseAdamW with everything sent: each rank divides its own gradient by the root of
    its own bias-corrected second moment. With ``first_moment="global"`` the mean of those
    drives Adam's first moment. With ``"local"``, each rank keeps the first moment of its
    own (for parameters of two or more dimensions: the biases step by the mean itself) and
    sends ``m_hat / sqrt(f)``, ``f = min(1, 1/P + (1 - 1/P) m_hat**2)``, its estimate of the
    averaged gradient's second moment; the step is the mean of what was sent."""
    world = len(results)
    params = {n: p.double().clone() for n, p in results[0]["init"].items()}
    v = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in range(world)]
    m = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in range(world + 1)]  # per rank, then global
    beta1, beta2 = BETAS
    for t in range(1, steps + 1):
        for n, value in params.items():
            normalised = []
            for r in range(world):
                g = results[r]["local"][t - 1][n].double()
                v[r][n] = beta2 * v[r][n] + (1 - beta2) * g * g
                normalised.append(g / ((v[r][n] / (1 - beta2**t)).sqrt() + EPS))
            if first_moment == "local" and value.dim() < 2:
                params[n] = value * (1 - LR * WD) - LR * sum(normalised) / world
                continue
            if first_moment == "global":
                m[world][n] = beta1 * m[world][n] + (1 - beta1) * sum(normalised) / world
                params[n] = value * (1 - LR * WD) - LR * m[world][n] / (1 - beta1**t)
                continue
            sent = []
            for r in range(world):
                m[r][n] = beta1 * m[r][n] + (1 - beta1) * normalised[r]
                m_hat = m[r][n] / (1 - beta1**t)
                sent.append(m_hat / (1 / world + (1 - 1 / world) * m_hat**2).clamp(max=1.0).sqrt())
            params[n] = value * (1 - LR * WD) - LR * sum(sent) / world
    return params


@pytest.mark.parametrize("first_moment", ["local", "global"])
def test_sparse_adamw_with_everything_sent_is_the_algorithm_written_out(first_moment):
    """The mean of the ranks' first moments is the first moment of the mean: both places
    give the same algorithm."""
    steps = 6
    results = run_distributed(_train, 2, "none", 1.0, steps, first_moment)
    assert torch.equal(results[0]["params"], results[1]["params"])
    expected = _reference(results, steps, first_moment)
    for name, value in expected.items():
        assert_close(results[0]["named"][name].double(), value, rtol=1e-5, atol=1e-6)
    assert all(r["restored_same"] for r in results)


def test_sparse_adamw_warms_up_with_everything_sent_then_selects_top_k():
    """The warm-up's steps are SparseAdamW with everything sent (the algorithm written out),
    and nothing is held back; the first step after it selects, and error feedback keeps
    the rest."""
    results = run_distributed(_train, 2, "topk", 0.1, 4, "local", 3)
    assert torch.equal(results[0]["params"], results[1]["params"])
    for name, value in _reference(results, 3, "local").items():
        assert_close(results[0]["warmed"][name].double(), value, rtol=1e-5, atol=1e-6)
    for r in results:
        assert r["held"][:3] == [0.0, 0.0, 0.0] and r["held"][3] > 0
    assert all(r["restored_same"] for r in results)


def _check_first_step(results: List[Dict[str, Any]], sent_of: Any, **tolerance: float) -> None:
    """Step 0, per parameter and rank: the normalised gradient (g / (|g| + eps) at the first
    step, Adam's sign: v = (1 - beta2) g^2, bias-corrected g^2; over the root of f, which is
    1 but where eps counts) is what the rank sent,
    ``sent_of(residual, normalised)``, plus its residual (conservation); the hook's output
    is the mean of what was sent; the replicas are identical; the checkpoint round-trips."""
    assert torch.equal(results[0]["params"], results[1]["params"])
    names = list(results[0]["residual"])
    assert names
    for name in names:
        sent = []
        for r in results:
            g = r["local"][0][name].double().reshape(-1)
            normalised = g / (g.abs() + EPS)
            world = len(results)  # what each rank compresses: its estimate for the averaged gradient
            normalised = normalised / (1 / world + (1 - 1 / world) * normalised**2).clamp(max=1.0).sqrt()
            residual = r["residual"][name].reshape(-1).double()
            sent.append(sent_of(residual, normalised))
            assert_close(residual + sent[-1], normalised, **tolerance)
        expected = torch.stack(sent).sum(0) / len(results)
        for r in results:
            assert_close(r["averaged"][name].reshape(-1).double(), expected, **tolerance)
    assert all(r["restored_same"] for r in results)


def test_sparse_adamw_top_k_keeps_the_normalised_gradient_and_replicas_identical():
    """Each rank sent the top-k of its normalised gradient; the residual holds the rest."""
    density = 0.1

    def top_k(residual: torch.Tensor, normalised: torch.Tensor) -> torch.Tensor:
        chosen = residual == 0
        assert int(chosen.sum()) >= k_for_density(density, normalised.numel())
        return torch.where(chosen, normalised, torch.zeros_like(normalised))

    _check_first_step(run_distributed(_train, 2, "topk", density, 4), top_k, rtol=1.3e-6, atol=1e-5)


def test_sparse_adamw_with_signs_sends_the_scaled_sign_of_the_update_direction():
    """Each rank's update direction is its normalised gradient (the first moment,
    bias-corrected, of one step); it sent the scaled signs of it per block of 64."""

    def scaled_signs(residual: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        signs = torch.empty_like(direction)
        for start in range(0, direction.numel(), 64):
            chunk = direction[start : start + 64]
            scale = chunk.abs().mean().float().to(torch.bfloat16).double()  # sent as bfloat16
            signs[start : start + 64] = torch.where(chunk >= 0, 1.0, -1.0) * scale
        return signs

    # a bfloat16 rounding of a scale (about 1) apart at most
    _check_first_step(run_distributed(_train, 2, "sign", 1.0, 4), scaled_signs, rtol=4e-3, atol=4e-3)
