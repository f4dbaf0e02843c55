"""The worked examples of docs/extending.md, run as written: a compressor, a collective and a
route added through the public extension points train on real gloo ranks, against
independently computed references. Workers return their tensors; every check is made here,
in the parent."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import gradsparse as gs
from gradsparse.compressors import k_for_density
from gradsparse.engine import routes

from .harness import flat_params, run_distributed
from .test_ddp_hook import loss_of, make_model

PAGE = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def _page_code() -> str:
    """The page's python blocks, in order (the compressor, the collective, the route)."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 3, f"expected the three examples' python blocks in {PAGE}"
    return "\n".join(blocks)


EXAMPLE = "gradsparse_extending_example"
REGISTERED = (
    ("blockmax", gs.compressors.registry),
    ("list_allgather", gs.comm.registry),
    ("densified", routes.registry),
)


def _load_examples() -> None:
    """Run the page's examples once in this process, as a module of its own (dataclasses
    look their module up in sys.modules). Each spawned rank calls it first."""
    if EXAMPLE in sys.modules:
        return
    module = types.ModuleType(EXAMPLE)
    sys.modules[EXAMPLE] = module
    exec(compile(_page_code(), str(PAGE), "exec"), module.__dict__)  # our own docs page


@pytest.fixture
def examples():
    """The examples registered in this (the parent) process for one test, then removed, so
    that no other test sees them."""
    _load_examples()
    yield
    for name, registry in REGISTERED:
        registry._items.pop(name, None)
    del sys.modules[EXAMPLE]


DENSITY = 0.1


def _train(rank: int, world: int, steps: int) -> Dict[str, Any]:
    _load_examples()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(
        ddp, "topk", density=DENSITY, route="densified", scope="layer", min_compress_numel=1000
    )  # per parameter (scope="layer"), so that the reference below is per parameter too
    assert type(state.policy.route).__name__ == "DensifiedRoute"
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    first: Dict[str, Any] = {}
    losses = []
    for step in range(steps):
        opt.zero_grad()
        if step == 0:  # this rank's own gradient, computed apart from DDP
            local = make_model()
            local.load_state_dict(model.state_dict())
            loss_of(local, rank, step).backward()
            first["local"] = {n: p.grad.clone() for n, p in local.named_parameters()}
        loss = loss_of(ddp, rank, step)
        loss.backward()
        if step == 0:
            first["averaged"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            first["residual"] = {n: state.feedback.residual(n).clone() for n in state.feedback.names()}
        opt.step()
        losses.append(float(loss))
    dist.barrier()
    return {"params": flat_params(model), "losses": losses, **first, "selected": state.counters.selected}


def test_the_page_registers_its_examples_and_a_bad_name_lists_the_valid_ones(examples):
    assert "densified" in routes.available()
    assert "blockmax" in gs.compressors.available() and "list_allgather" in gs.comm.available()
    with pytest.raises(ValueError, match="`block`"):
        gs.compressors.build("blockmax", block=0)
    with pytest.raises(ValueError, match=r"unknown route 'nope'; expected one of \[.*'densified'"):
        gs.SparseHookState("topk", route="nope")


def test_a_route_added_by_the_extending_page_trains_on_real_ranks():
    world, steps = 2, 40
    results = run_distributed(_train, world, steps)
    # Replicas are bit-identical after training.
    for other in results[1:]:
        assert torch.equal(other["params"], results[0]["params"])
    # Step 0, against a reference computed here: each rank sent its top-k of its own
    # gradient (no residual yet); the residual is the rest (conservation); the hook's
    # output is the mean of what the ranks sent.
    names = list(results[0]["residual"])
    assert names, "the compressed parameters keep residuals"
    for name in names:
        sent = []
        for r in results:
            grad = r["local"][name].reshape(-1)
            k = k_for_density(DENSITY, grad.numel())
            top = torch.zeros_like(grad)
            idx = torch.topk(grad.abs(), k).indices
            top[idx] = grad[idx]
            assert_close(r["residual"][name] + top, grad, rtol=0, atol=0)
            sent.append(top)
        expected = torch.stack(sent).sum(0) / world
        for r in results:
            assert_close(r["averaged"][name].reshape(-1), expected)
    # It learns.
    losses = results[0]["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def _blockmax_step(rank: int, world: int) -> Dict[str, Any]:
    _load_examples()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(ddp, "blockmax", block=32, scope="layer", min_compress_numel=1000)
    local = make_model()
    loss_of(local, rank, 0).backward()
    loss_of(ddp, rank, 0).backward()
    return {
        "local": {n: p.grad.clone() for n, p in local.named_parameters()},
        "averaged": {n: p.grad.clone() for n, p in model.named_parameters()},
        "residual": {n: state.feedback.residual(n).clone() for n in state.feedback.names()},
    }


def test_the_pages_compressor_sends_each_blocks_largest_entry():
    results = run_distributed(_blockmax_step, 2)
    names = list(results[0]["residual"])
    assert names
    for name in names:
        sent = []
        for r in results:
            grad = r["local"][name].reshape(-1)
            top = torch.zeros_like(grad)
            for start in range(0, grad.numel(), 32):  # a plain loop: the reference
                block = grad[start : start + 32]
                i = start + int(block.abs().argmax())
                top[i] = grad[i]
            assert_close(r["residual"][name] + top, grad, rtol=0, atol=0)
            sent.append(top)
        for r in results:
            assert_close(r["averaged"][name].reshape(-1), torch.stack(sent).sum(0) / 2)


def _train_with(rank: int, world: int, collective: str) -> torch.Tensor:
    _load_examples()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    gs.register_sparse_hook(ddp, "topk", density=0.05, collective=collective, min_compress_numel=1000)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(10):
        opt.zero_grad()
        loss_of(ddp, rank, step).backward()
        opt.step()
    return flat_params(model)


def test_the_pages_collective_sums_exactly_as_allgather_does():
    """Both sum the same payloads in rank order: the same bits, step after step."""
    mine = run_distributed(_train_with, 3, "list_allgather")
    reference = run_distributed(_train_with, 3, "allgather")
    for a, b in zip(mine, reference):
        assert torch.equal(a, b)
    assert torch.equal(mine[0], mine[1]) and torch.equal(mine[0], mine[2])
