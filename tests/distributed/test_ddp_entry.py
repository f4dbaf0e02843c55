"""Ways into the hook beyond a plain DDP script: a state built in the parent and pickled
into spawned workers, sparse embedding gradients, compiled DDP's per-parameter calls, and
registrations that must be refused."""

import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gradsparse as gs

from .harness import check_on_ranks, flat_params, gather_all, run_distributed
from .test_ddp_hook import loss_of, make_model

# --- a state pickled into spawned workers ------------------------------------------------


def _spawned(rank, world, model, state):
    # spawn passes CPU tensors through shared memory: both workers would otherwise train one
    # storage. Unshare it in place; the Parameter objects (the ones the state knows) stay.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(state, gs.sparse_allreduce_hook)  # the PyTorch way, no re-attach
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(4):
        opt.zero_grad()
        loss_of(ddp, rank, step).backward()
        opt.step()
    copies = gather_all(flat_params(model))
    assert all(torch.equal(copies[0], c) for c in copies)
    names = sorted(state.feedback.names())
    del ddp
    return names


@pytest.mark.parametrize("collective", ["allgather", "shared_topk"])
def test_a_state_built_in_the_parent_keys_residuals_by_name_in_spawned_workers(collective):
    model = make_model()
    state = gs.SparseHookState("topk", collective=collective, named_parameters=model.named_parameters())
    names = run_distributed(_spawned, 2, model, state)  # spawn pickles both into the workers
    expected = sorted(n for n, p in model.named_parameters() if p.numel() >= 1024)
    assert names[0] == names[1] == expected


# --- sparse embedding gradients ------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 16, sparse=True)
        self.out = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids).mean(1))


def _sparse_embedding(rank, world):
    torch.manual_seed(0)
    plain, hooked = Bag(), Bag()
    hooked.load_state_dict(plain.state_dict())
    ddp_plain = nn.parallel.DistributedDataParallel(plain)
    ddp_hooked = nn.parallel.DistributedDataParallel(hooked)
    state = gs.register_sparse_hook(ddp_hooked, "topk", density=0.1, min_compress_numel=0)
    for step in range(3):
        gen = torch.Generator().manual_seed(10 * rank + step)
        ids = torch.randint(0, 500, (8, 5), generator=gen)  # rows repeat within and across ranks
        for ddp in (ddp_plain, ddp_hooked):
            ddp.zero_grad(set_to_none=True)
            ddp(ids).pow(2).mean().backward()
        assert ddp_hooked.module.embed.weight.grad.is_sparse
        assert_close(hooked.embed.weight.grad.to_dense(), plain.embed.weight.grad.to_dense(), rtol=1e-6, atol=1e-7)
    assert state.stats()["bytes_sent"] > 0
    del ddp_plain, ddp_hooked


def test_sparse_embedding_gradients_equal_ddp():
    check_on_ranks(_sparse_embedding, 2)


# --- compiled DDP: hook(state, (param.grad, param)) ------------------------------------------


def _compiled(rank, world, compressor, params, spelling):
    """Compiled DDP in the two spellings users write: the config flag with the eager
    backend, or compiled autograd entered with an AOT backend (which traces the backward,
    and would trace into the hook's compiled kernels but for ``torch.compiler.disable``)."""
    import contextlib

    import torch._dynamo
    from torch._dynamo import compiled_autograd

    torch._dynamo.config.optimize_ddp = "python_reducer"
    torch._dynamo.reset()
    results = []
    for hook in (None, compressor):
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        state = None
        if hook is not None:
            state = gs.register_sparse_hook(ddp, hook, min_compress_numel=0, **params)
        if spelling == "config":
            torch._dynamo.config.compiled_autograd = True
            compiled, entered = torch.compile(ddp, backend="eager"), contextlib.nullcontext()
        else:
            torch._dynamo.config.compiled_autograd = False
            compiled = torch.compile(ddp, backend="aot_eager")
            entered = compiled_autograd._enable(torch.compile(backend="aot_eager"))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            opt.zero_grad()
            with entered if step == 0 else _reenter(spelling):
                loss_of(compiled, rank, step).backward()
            opt.step()
        results.append((flat_params(model), state))
    (eager_like, _), (sparse, state) = results
    copies = gather_all(sparse)
    assert all(torch.equal(copies[0], c) for c in copies), "compiled: replicas diverged"
    names = set(state.feedback.names()) if state.options.error_feedback else set()
    return eager_like, sparse, names, state.step


def _reenter(spelling):
    import contextlib

    import torch._dynamo
    from torch._dynamo import compiled_autograd

    if spelling == "config":
        return contextlib.nullcontext()
    return compiled_autograd._enable(torch.compile(backend="aot_eager"))


@pytest.mark.parametrize("spelling", ["config", "enable"])
@pytest.mark.parametrize(
    "compressor,params",
    [
        ("none", {}),
        ("topk", {"density": 0.05}),
        ("topk", {"density": 0.05, "collective": "shared_topk"}),
        ("topk", {"density": 0.05, "sync_free": True}),
        ("sign", {"block": 64}),  # its own route; each parameter's own blocks
    ],
)
def test_compiled_ddp_calls_the_hook_per_parameter(compressor, params, spelling):
    (eager_like, sparse, names, steps), _ = run_distributed(_compiled, 2, compressor, params, spelling)
    if compressor == "none":  # every entry sent: DDP's own average
        assert_close(sparse, eager_like, rtol=1e-6, atol=1e-7)
    else:
        assert names == {n for n, _ in make_model().named_parameters()}  # keyed by name, per parameter
        assert not torch.equal(sparse, eager_like)
    assert steps >= 2  # a step ends when a parameter comes round again


# --- registrations that are refused --------------------------------------------------------


def _refused(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    sharded = fully_shard(make_model(), mesh=init_device_mesh("cpu", (world,)))  # FSDP2 runs on CPU
    for wrong, words in (
        (model, "got Sequential"),
        (nn.DataParallel(model), "DataParallel is single-process"),
        (sharded, "FSDP shards gradients"),
    ):
        with pytest.raises(ValueError, match=words):
            gs.register_sparse_hook(wrong, "topk")
    ddp = nn.parallel.DistributedDataParallel(model)
    state = gs.register_sparse_hook(ddp, "topk")
    loss_of(ddp, rank, 0).backward()  # the state now serves this model's parameters
    with pytest.raises(ValueError, match="already has a communication hook"):
        gs.register_sparse_hook(ddp, "topk")
    other = nn.parallel.DistributedDataParallel(make_model())
    with pytest.raises(ValueError, match="already registered on another DDP model"):
        gs.register_sparse_hook(other, state=state)
    # the PyTorch way around the check: the first bucket refuses another model
    other.register_comm_hook(state, gs.sparse_allreduce_hook)
    with pytest.raises(Exception, match="not among the named parameters the state was attached to"):
        loss_of(other, rank, 0).backward()
    # a pickled copy of the model: its parameters carry the same name tags
    twin = nn.parallel.DistributedDataParallel(pickle.loads(pickle.dumps(model)))
    twin.register_comm_hook(state, gs.sparse_allreduce_hook)
    with pytest.raises(Exception, match="already serves another parameter named"):
        loss_of(twin, rank, 0).backward()
    del ddp, other, twin


def test_bad_registrations_are_refused_with_a_clear_error():
    check_on_ranks(_refused, 1)
