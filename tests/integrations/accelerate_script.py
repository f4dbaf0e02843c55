"""accelerate on 2 CPU ranks (under torchrun): the hook on the prepared model, with
gradient accumulation through accelerator.accumulate. Rank 0 writes argv[1]; argv[2], if
given, is the collective, or "sparse_adamw": the sign compressor under SparseAdamW, built on
the hook's state once the model is prepared, then prepared itself."""

import json
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

import gradsparse as gs
from tests.integrations.shutdown import shut_down

ACCUMULATE = 2


def main() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=gen)
    data = torch.utils.data.TensorDataset(x, (x[:, :5] * 3).argmax(1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    collective = sys.argv[2] if len(sys.argv) > 2 else "allgather"
    if collective == "sparse_adamw":
        model, loader = accelerator.prepare(model, loader)
        state = gs.register_sparse_hook(model, "sign", min_compress_numel=0)
        opt = accelerator.prepare(gs.optim.SparseAdamW(model.parameters(), lr=0.01, hook=state))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        state = gs.register_sparse_hook(model, "topk", density=0.05, min_compress_numel=0, collective=collective)
    batches = 0
    for inputs, labels in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.cross_entropy(model(inputs), labels)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        batches += 1
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    assert all(torch.equal(copies[0], c) for c in copies), "replicas diverged"
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            moments = sorted(set(state.preconditioner.steps.values())) if state.preconditioner else []
            result = {**state.stats(), "batches": batches, "distributed": str(accelerator.distributed_type)}
            json.dump({**result, "moment_steps": moments}, fh)
    shut_down(accelerator.end_training)  # end_training destroys the process group


if __name__ == "__main__":
    main()
