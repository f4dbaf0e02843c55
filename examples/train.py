"""A complete data-parallel training script with the sparse hook.

Runs unchanged under any launcher gradsparse.launch recognises:

    torchrun --standalone --nproc-per-node 4 examples/train.py
    mpirun -n 4 python examples/train.py --backend mpi      # sum sparse payloads over MPI
    srun -n 4 python examples/train.py                      # with MASTER_ADDR/MASTER_PORT set
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn

import gradsparse as gs
from gradsparse.launch import init_distributed
from gradsparse.train.digits import build_model, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressor", default="topk")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--collective", default="allgather")
    parser.add_argument("--backend", choices=["torch", "mpi"], default="torch", help="transport of the sparse sums")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    info = init_distributed()  # torchrun, OpenMPI, MPICH/Intel MPI or Slurm
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x, y, x_test, y_test = load_digits_split()
    model = build_model("cnn")
    ddp = nn.parallel.DistributedDataParallel(model)
    options = {"backend": gs.comm.MPIBackend()} if args.backend == "mpi" else {}
    state = gs.register_sparse_hook(
        ddp, compressor=args.compressor, density=args.density, collective=args.collective, **options
    )
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(args.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))[rank::world]
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    stats = state.stats()
    if rank == 0:
        print(
            f"launched by {info.launcher}: {world} ranks, test accuracy {accuracy:.3f}, "
            f"sent {stats['bytes_sent'] / 1e6:.2f} MB per rank ({stats['compression_ratio']:.0f}x less than dense)"
        )
    del ddp  # release the hook's futures before shutting down (see README, "Shutting down")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
