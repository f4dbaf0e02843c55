"""Run under ``horovodrun --gloo -np 2`` or ``mpirun -np 2``: train with
gradsparse.integrations.horovod.DistributedOptimizer and save rank 0's final parameters to argv[1]."""

import sys
from pathlib import Path

import horovod.torch as hvd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gradsparse.integrations.horovod import DistributedOptimizer
from tests.distributed.test_ddp_hook import loss_of, make_model

STEPS = 12


def main() -> None:
    out, min_numel = sys.argv[1], int(sys.argv[2])
    try:  # bad input: Horovod not initialised yet
        DistributedOptimizer(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    except RuntimeError as exc:
        assert "hvd.init()" in str(exc), exc
    else:
        raise AssertionError("DistributedOptimizer before hvd.init() did not fail")
    hvd.init()
    torch.set_num_threads(1)
    model = make_model()
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        named_parameters=model.named_parameters(),
        compressor="topk",
        density=0.02,
        min_compress_numel=min_numel,
    )
    assert isinstance(opt, torch.optim.Optimizer)
    # a scheduler that keeps the rate for STEPS steps, then drops it: drives our optimizer,
    # and its changes reach the wrapped one
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEPS, gamma=0.5)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, hvd.rank(), step).backward()
        opt.step()
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.025, opt.optimizer.param_groups[0]["lr"]
    saved = opt.state_dict()
    assert saved["hook"]["step"] == STEPS and saved["hook"]["error_feedback"]["residuals"]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0))
    assert all(torch.equal(everyone[0], row) for row in everyone), "Horovod replicas differ"
    check_shared_topk(min_numel)
    check_sparse_adamw_warm_up(min_numel)
    if hvd.rank() == 0:
        torch.save({"params": flat, "bytes_sent": opt.bytes_sent}, out)
        print("HOROVOD CHECKS PASSED")


def check_shared_topk(min_numel: int) -> None:
    """shared_topk over Horovod's broadcast and allreduce: replicas stay identical."""
    model = make_model(seed=1)
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        named_parameters=model.named_parameters(),
        compressor="topk",
        density=0.05,
        collective="shared_topk",
        min_compress_numel=min_numel,
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(4):
        opt.zero_grad()
        loss_of(model, hvd.rank(), step).backward()
        opt.step()
    assert opt.hook_state.policy.route.rounds > 0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0))
    assert all(torch.equal(everyone[0], row) for row in everyone), "Horovod replicas differ under shared_topk"


def check_sparse_adamw_warm_up(min_numel: int) -> None:
    """SparseAdamW on the Horovod optimizer's hook state, with top-k: its warm-up's dense
    step and steps of signs (the sign route, over Horovod's allgather), then top-k; replicas
    stay identical."""
    from gradsparse.optim import SparseAdamW

    model = make_model(seed=2)
    inner = SparseAdamW(model.parameters(), lr=1e-3, dense_steps=1, sign_steps=2)
    opt = DistributedOptimizer(
        inner, named_parameters=model.named_parameters(), compressor="topk", density=0.05, min_compress_numel=min_numel
    )
    inner.attach(opt.hook_state)
    assert (opt.hook_state.options.start_step, opt.hook_state.options.sign_warmup_steps) == (1, 2)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(5):
        opt.zero_grad()
        loss_of(model, hvd.rank(), step).backward()
        opt.step()
    assert opt.hook_state.policy._signs is not None, "the sign warm-up was not taken"
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0))
    assert all(torch.equal(everyone[0], row) for row in everyone), "Horovod replicas differ under SparseAdamW"


if __name__ == "__main__":
    main()
