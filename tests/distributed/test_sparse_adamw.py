"""SparseAdamW with the hook's preconditioner on real gloo ranks. Workers return what they
saw (their own gradients, computed apart from DDP, and the results); every check is made
here, in the parent, against a reference of the algorithm written out below."""

from __future__ import annotations

import io
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.compressors import k_for_density

from .harness import flat_params, run_distributed
from .test_ddp_hook import loss_of, make_model

LR, BETAS, EPS, WD = 0.01, (0.9, 0.99), 1e-8, 0.1


def _train(rank: int, world: int, compressor: str, density: float, steps: int) -> Dict[str, Any]:
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    options = {"density": density} if compressor == "topk" else {}
    state = gs.register_sparse_hook(ddp, compressor, scope="layer", min_compress_numel=1000, **options)
    opt = gs.optim.SparseAdamW(ddp.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, hook=state)
    local_grads: List[Dict[str, torch.Tensor]] = []
    first: Dict[str, Any] = {}
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
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    restored = gs.SparseHookState(gs.compressors.build(compressor, **options))
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert restored.preconditioner is not None and state.preconditioner is not None
    same = all(
        torch.equal(restored.preconditioner.second_moments[n], v)
        for n, v in state.preconditioner.second_moments.items()
    )
    dist.barrier()
    return {
        "params": flat_params(model),
        "named": {n: p.detach().clone() for n, p in model.named_parameters()},
        "init": {n: p.detach().clone() for n, p in make_model().named_parameters()},
        "local": local_grads,
        "restored_same": same,
        **first,
    }


def _reference(results: List[Dict[str, Any]], steps: int) -> Dict[str, torch.Tensor]:
    """SparseAdamW with everything sent: each rank divides its own gradient by the root of
    its own bias-corrected second moment; the mean of those drives Adam's first moment."""
    world = len(results)
    params = {n: p.double().clone() for n, p in results[0]["init"].items()}
    v = [{n: torch.zeros_like(p) for n, p in params.items()} for _ in range(world)]
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    beta1, beta2 = BETAS
    for t in range(1, steps + 1):
        for n, value in params.items():
            normalised = []
            for r in range(world):
                g = results[r]["local"][t - 1][n].double()
                v[r][n] = beta2 * v[r][n] + (1 - beta2) * g * g
                normalised.append(g / ((v[r][n] / (1 - beta2**t)).sqrt() + EPS))
            m[n] = beta1 * m[n] + (1 - beta1) * sum(normalised) / world
            params[n] = value * (1 - LR * WD) - LR * m[n] / (1 - beta1**t)
    return params


def test_sparse_adamw_with_everything_sent_is_the_algorithm_written_out():
    steps = 6
    results = run_distributed(_train, 2, "none", 1.0, steps)
    assert torch.equal(results[0]["params"], results[1]["params"])
    expected = _reference(results, steps)
    for name, value in expected.items():
        assert_close(results[0]["named"][name].double(), value, rtol=1e-5, atol=1e-6)
    assert all(r["restored_same"] for r in results)


def test_sparse_adamw_top_k_keeps_the_normalised_gradient_and_replicas_identical():
    """Step 0, per parameter: each rank sent the top-k of its normalised gradient
    (g / (|g| + eps) at the first step, Adam's sign), the residual holds the rest
    (conservation), and the hook's output is the mean of what was sent."""
    density = 0.1
    results = run_distributed(_train, 2, "topk", density, 4)
    assert torch.equal(results[0]["params"], results[1]["params"])
    names = list(results[0]["residual"])
    assert names
    for name in names:
        sent = []
        for r in results:
            g = r["local"][0][name].double().reshape(-1)
            normalised = (g / (g.abs() + EPS)).float()  # v = (1 - beta2) g^2, bias-corrected: g^2
            residual = r["residual"][name]
            chosen = residual == 0
            assert int(chosen.sum()) >= k_for_density(density, g.numel())
            assert_close(residual + torch.where(chosen, normalised, torch.zeros_like(normalised)), normalised)
            sent.append(torch.where(chosen, normalised, torch.zeros_like(normalised)))
        expected = torch.stack(sent).sum(0) / len(results)
        for r in results:
            assert_close(r["averaged"][name].reshape(-1), expected)
    assert all(r["restored_same"] for r in results)
