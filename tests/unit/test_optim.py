"""SparseAdamW and the preconditioner: validation at the boundary, and the division."""

from __future__ import annotations

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
