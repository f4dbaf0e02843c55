"""Horovod backend: the collectives over Horovod's own operations.

``allgather`` and ``alltoall`` carry the sparse collectives (every sum is still formed by
our code in rank order, so results are bit-identical to the other backends), and
``allreduce`` (sum) is the dense path. Horovod has no point-to-point operations, so
``recursive_doubling`` is refused on it. Operations are blocking and issued in the same
order on every rank, which Horovod's name-less operations require.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .backend import Backend, completed_future

__all__ = ["HorovodBackend"]


def _import_horovod() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("HorovodBackend needs Horovod built for this torch: run scripts/install-horovod") from exc
    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialised: call hvd.init() first")
    return hvd


class HorovodBackend(Backend):
    """Collectives over Horovod (its global process set)."""

    def __init__(self) -> None:
        super().__init__()
        self.hvd = _import_horovod()

    @property
    def rank(self) -> int:
        return int(self.hvd.rank())

    @property
    def size(self) -> int:
        return int(self.hvd.size())

    def __getstate__(self) -> Any:
        raise TypeError("HorovodBackend holds Horovod's runtime and cannot be pickled")

    def _allgather_fixed(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        return completed_future(self.hvd.allgather(tensor.contiguous()))

    def _alltoall(
        self, tensor: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> torch.futures.Future[torch.Tensor]:
        splits = torch.tensor(list(send_counts), dtype=torch.int32)
        out, received = self.hvd.alltoall(tensor.contiguous(), splits=splits)
        if received.tolist() != list(recv_counts):
            raise RuntimeError(
                f"Horovod alltoall delivered {received.tolist()} entries per rank, expected {recv_counts}"
            )
        return completed_future(out)

    def _allreduce_native(self, tensor: torch.Tensor) -> Optional[torch.futures.Future[torch.Tensor]]:
        if self.size == 1:
            return completed_future(tensor)
        tensor.copy_(self.hvd.allreduce(tensor, op=self.hvd.Sum))
        return completed_future(tensor)

    def _broadcast(self, tensor: torch.Tensor, root: int) -> torch.futures.Future[torch.Tensor]:
        self.hvd.broadcast_(tensor, root_rank=root)
        return completed_future(tensor)

    def _sendrecv(self, send: torch.Tensor, peer: int, recv_numel: int) -> torch.Tensor:
        raise NotImplementedError(
            "Horovod has no point-to-point operations: use the allgather, split_allgather, oktopk, dense "
            "or auto collective (not recursive_doubling) with HorovodBackend"
        )
