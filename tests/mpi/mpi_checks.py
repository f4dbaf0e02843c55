"""Run under ``mpirun -n 4``: the collectives on MPIBackend against TorchDistBackend (gloo)
on the same inputs, bit for bit, and the hook with MPIBackend while DDP stays on gloo.

Exits non-zero on the first failure; rank 0 prints ``MPI CHECKS PASSED`` at the end.
"""

import sys
from pathlib import Path
from typing import Union

import torch
import torch.distributed as dist
from mpi4py import MPI
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gradsparse as gs
from gradsparse.comm import Collective, MPIBackend, SharedTopkCollective, TorchDistBackend, build
from gradsparse.comm.auto import AutoCollective
from gradsparse.launch import init_distributed
from tests.distributed.test_collectives import make_payload, reference

COLLECTIVES = ["allgather", "split_allgather", "recursive_doubling", "dense", "oktopk", "auto"]
PATTERNS = ["random", "same", "disjoint", "skewed", "dense", "empty_some"]


def check_collectives(mpi: MPIBackend, gloo: TorchDistBackend) -> int:
    checked = 0
    for seed, (pattern, density, dtype, numel) in enumerate(
        (p, d, t, n)
        for p in PATTERNS
        for d in (0.01, 0.2)
        for t in (torch.float32, torch.float16)
        for n in (1, 999, 20_000)
    ):
        case = (numel, pattern, density, dtype, seed)
        mine = make_payload(mpi.rank, *case)
        expected = reference(mpi.size, *case)
        for name in COLLECTIVES:
            outs = []
            for backend in (mpi, gloo):
                collective = build(name) if name != "auto" else AutoCollective(1e-4, 1e8, 1e10)
                reduced = collective.reduce(mine, backend).wait()
                outs.append(reduced.write(torch.empty(reduced.numel, dtype=dtype)))
            assert torch.equal(outs[0], outs[1]), f"{name} {case}: MPI and gloo results differ"
            if name != "oktopk":
                tol = 1e-2 if dtype == torch.float16 else 1e-5
                torch.testing.assert_close(outs[0].double(), expected, rtol=tol, atol=tol)
            copies = mpi.comm.allgather(outs[0].numpy().tobytes())
            assert all(c == copies[0] for c in copies), f"{name} {case}: ranks differ"
            checked += 1
    return checked


def check_accounting(mpi: MPIBackend, gloo: TorchDistBackend) -> None:
    payload = make_payload(mpi.rank, 8000, "random", 0.05, torch.float32, 1)
    for name in ("allgather", "split_allgather", "recursive_doubling", "dense", "shared_topk"):
        deltas = []
        for backend in (mpi, gloo):
            before = backend.stats.as_dict()
            build(name).reduce(payload, backend).wait()
            deltas.append({k: v - before[k] for k, v in backend.stats.as_dict().items()})
        assert deltas[0] == deltas[1], f"{name}: accounting differs between backends: {deltas}"


def train(backend_factory, collective: Union[str, Collective]) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    ddp = nn.parallel.DistributedDataParallel(model)  # DDP's own group stays gloo
    gs.register_sparse_hook(ddp, "topk", density=0.05, collective=collective, backend=backend_factory())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(10):
        x = torch.randn(16, 20, generator=gen)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    init_distributed(backend="gloo")
    mpi, gloo = MPIBackend(MPI.COMM_WORLD), TorchDistBackend()
    assert mpi.rank == gloo.rank and mpi.size == gloo.size
    checked = check_collectives(mpi, gloo)
    check_accounting(mpi, gloo)
    # shared_topk sums in rank order here, so that MPI and gloo give the same bits
    shared = SharedTopkCollective(rank_order=True)
    for collective in ("allgather", "split_allgather", "recursive_doubling", "oktopk", shared):
        with_mpi = train(lambda: MPIBackend(MPI.COMM_WORLD), collective)
        with_gloo = train(TorchDistBackend, collective)
        assert torch.equal(with_mpi, with_gloo), f"hook with {collective}: MPI and gloo training differ"
        copies = MPI.COMM_WORLD.allgather(with_mpi.numpy().tobytes())
        assert all(c == copies[0] for c in copies), f"hook with {collective}: replicas differ"
    MPI.COMM_WORLD.Barrier()
    if mpi.rank == 0:
        print(f"MPI CHECKS PASSED: {checked} collective cases on {mpi.size} ranks, bit-identical to gloo")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
