"""A small real DDP run of the sparse hook (launched by scripts/demo under torchrun).

Trains the same MLP on the same data three times: dense allreduce, top-k 1% and top-k
0.1% with error feedback, and prints loss, accuracy and bytes each rank sent.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn

import gradsparse as gs


def make_data(
    rank: int, world: int, n: int = 4096, dim: int = 64, classes: int = 10
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(dim, classes, generator=gen)
    x = torch.randn(n, dim, generator=gen)
    y = (x @ teacher).argmax(1)
    return x[rank::world], y[rank::world], x[-512:], y[-512:]


def run(config: str, args: argparse.Namespace) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    state = None
    if config != "dense":
        name, density = config.split(":")
        state = gs.register_sparse_hook(ddp, compressor=name, density=float(density))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    x, y, x_test, y_test = make_data(rank, world)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for i in range(0, len(x), args.batch_size):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x[i : i + args.batch_size]), y[i : i + args.batch_size])
            loss.backward()
            opt.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.epochs * -(-len(x) // args.batch_size)
    dense_bytes = 2 * (world - 1) * 4 * n_params // world * steps
    sent = state.stats()["bytes_sent"] if state else dense_bytes
    return {
        "config": config,
        "loss": loss.item(),
        "accuracy": accuracy,
        "sent": sent,
        "dense": dense_bytes,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--configs", default="dense,topk:0.01,topk:0.001")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rows = [run(c, args) for c in args.configs.split(",")]
    if dist.get_rank() == 0:
        print(f"\n{dist.get_world_size()} ranks, {args.epochs} epochs; bytes are what each rank sent")
        header = ("config", "loss", "test acc", "sent MB", "dense MB", "ratio", "time s")
        print(f"{header[0]:<14}" + "".join(f"{h:>10}" for h in header[1:]))
        for r in rows:
            ratio = f"{r['dense'] / max(r['sent'], 1):.1f}x"
            cells = (
                f"{r['loss']:.3f}",
                f"{r['accuracy']:.3f}",
                f"{r['sent'] / 1e6:.2f}",
                f"{r['dense'] / 1e6:.2f}",
                ratio,
                f"{r['seconds']:.1f}",
            )
            print(f"{r['config']:<14}" + "".join(f"{c:>10}" for c in cells))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
