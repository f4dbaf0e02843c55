"""Does a torchrun job abort at interpreter exit? Three steps of a small MLP under DDP, then
exit, with or without our hook, PyTorch's PowerSGD hook, and destroy_process_group().

    for i in $(seq 12); do torchrun --standalone --nproc-per-node 2 scripts/shutdown_repro.py plain || echo ABORT; done
    # modes: plain | sparse | powersgd, and add "destroy" to call destroy_process_group() at the end
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

import gradsparse as gs

mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
dist.init_process_group("gloo")
ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)))
if mode == "sparse":
    gs.register_sparse_hook(ddp, "topk", density=0.05)
elif mode == "powersgd":
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    state = powersgd.PowerSGDState(None, matrix_approximation_rank=1, start_powerSGD_iter=2)
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)
for _ in range(3):
    ddp(torch.randn(8, 20)).sum().backward()
if "destroy" in sys.argv[2:]:
    dist.destroy_process_group()
