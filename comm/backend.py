"""Communication backends: the few primitives the sparse collectives need, with byte
accounting.

Every primitive records what this rank sent and received and how many messages it took,
using the algorithm the transport runs (ring allgather, pairwise all-to-all, ring
allreduce), so ``CommStats`` matches the analytic formulas.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["Backend", "CommStats", "TorchDistBackend", "completed_future"]


@dataclass
class CommStats:
    """Bytes and messages this rank sent and received. ``control_bytes`` counts the
    small fixed-size headers (counts, flags) apart from the payload."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    control_bytes: int = 0

    def add(self, other: CommStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def completed_future(value: Any) -> torch.futures.Future[Any]:
    fut: torch.futures.Future[Any] = torch.futures.Future()
    fut.set_result(value)
    return fut


class Backend(ABC):
    """Transport for the sparse collectives. Tensors stay on their device."""

    def __init__(self) -> None:
        self.stats = CommStats()

    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def _allgather_fixed(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """All ranks' equal-sized 1-D tensors, concatenated in rank order."""

    @abstractmethod
    def _alltoall(
        self, tensor: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> torch.futures.Future[torch.Tensor]:
        """Send ``tensor[send offsets]`` to each rank; receive in rank order."""

    @abstractmethod
    def _allreduce_sum(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """In-place sum across ranks."""

    # Accounted primitives used by the collectives -------------------------------------

    def allgather_control(self, tensor: torch.Tensor) -> torch.Tensor:
        """Blocking allgather of a small fixed-size header; returns shape (P, len)."""
        out = self._allgather_fixed(tensor).wait()
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.control_bytes += (self.size - 1) * nbytes
        self.stats.messages += self.size - 1
        return out.view(self.size, -1)

    def allgatherv(self, tensor: torch.Tensor, counts: Sequence[int]) -> torch.futures.Future[torch.Tensor]:
        """Variable-length allgather of 1-D tensors whose lengths ``counts`` every rank
        already knows; the result is their concatenation in rank order."""
        p, me = self.size, self.rank
        if tensor.numel() != counts[me]:
            raise ValueError(f"allgatherv: this rank holds {tensor.numel()} entries, counts say {counts[me]}")
        size = tensor.element_size()
        self.stats.bytes_sent += (p - 1) * counts[me] * size
        self.stats.bytes_received += (sum(counts) - counts[me]) * size
        self.stats.messages += p - 1
        if p == 1:
            return completed_future(tensor.clone())
        if all(c == counts[0] for c in counts):
            return self._allgather_fixed(tensor)
        # Unequal lengths: gloo's allgather needs equal sizes, and padding would send
        # bytes that carry nothing. An all-to-all with per-peer counts sends exactly the
        # payload, once to every peer.
        send = tensor.repeat(p)
        return self._alltoall(send, [counts[me]] * p, list(counts))

    def alltoallv(
        self, tensor: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> torch.futures.Future[torch.Tensor]:
        me, size = self.rank, tensor.element_size()
        self.stats.bytes_sent += (sum(send_counts) - send_counts[me]) * size
        self.stats.bytes_received += (sum(recv_counts) - recv_counts[me]) * size
        self.stats.messages += sum(1 for r, c in enumerate(send_counts) if r != me and c)
        if self.size == 1:
            return completed_future(tensor.clone())
        return self._alltoall(tensor, send_counts, recv_counts)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """Ring allreduce: 2(P-1)/P of the tensor's bytes each way, 2(P-1) messages."""
        p = self.size
        nbytes = tensor.numel() * tensor.element_size()
        moved = 2 * (p - 1) * nbytes // p
        self.stats.bytes_sent += moved
        self.stats.bytes_received += moved
        self.stats.messages += 2 * (p - 1)
        if p == 1:
            return completed_future(tensor)
        return self._allreduce_sum(tensor)


# torch >= 2.12 renames all_gather_into_tensor to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchDistBackend(Backend):
    """torch.distributed on any process group (gloo, NCCL, MPI). Never moves tensors
    between devices."""

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistBackend needs torch.distributed to be initialised; call "
                "torch.distributed.init_process_group() (or gradsparse.launch.init_distributed()) first"
            )
        self.group = process_group
        self._rank = dist.get_rank(process_group)
        self._size = dist.get_world_size(process_group)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def _allgather_fixed(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        out = torch.empty(self.size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        work = _all_gather_single(out, tensor.contiguous(), group=self.group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda _f: out)

    def _alltoall(
        self, tensor: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> torch.futures.Future[torch.Tensor]:
        out = torch.empty(sum(recv_counts), dtype=tensor.dtype, device=tensor.device)
        work = dist.all_to_all_single(
            out, tensor.contiguous(), list(recv_counts), list(send_counts), group=self.group, async_op=True
        )
        assert work is not None
        return work.get_future().then(lambda _f: out)

    def _allreduce_sum(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        assert work is not None
        return work.get_future().then(lambda _f: tensor)
