"""Communication backends: the few primitives the sparse collectives need, with byte
accounting.

Backends move bytes; they never reduce. Every sum is computed by the collectives in a
fixed rank order, so results are bit-identical on every rank and on every backend
(gloo's and OpenMPI's own reductions add in different orders).

Every primitive records what this rank sent and received and how many messages it took,
for the algorithm the transport runs (ring allgather, pairwise all-to-all,
point-to-point), so ``CommStats`` matches the analytic formulas.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "Backend",
    "CommStats",
    "TorchDistBackend",
    "binomial_sends",
    "completed_future",
    "ring_allreduce_bytes",
]


def ring_allreduce_bytes(numel: int, itemsize: int, world: int) -> int:
    """Bytes one rank sends in a ring (or reduce-scatter + allgather) allreduce:
    2(P-1)/P of the tensor. The one place this formula lives."""
    return 2 * (world - 1) * numel * itemsize // max(world, 1)


def binomial_sends(rank: int, root: int, world: int) -> int:
    """How many copies ``rank`` sends in a binomial-tree broadcast from ``root`` (gloo's
    and MPI's broadcast): the root about log2(P), leaves none."""
    vrank, dim = (rank - root) % world, max(world - 1, 0).bit_length()
    sends = 0
    for i in range(dim):
        above = ((1 << dim) - 1) & ~((1 << (i + 1)) - 1)
        if vrank & above == 0 and not vrank & (1 << i) and (vrank | (1 << i)) < world:
            sends += 1
    return sends


@dataclass
class CommStats:
    """Bytes and messages this rank sent and received. ``control_bytes`` counts the
    small fixed-size headers (counts, flags) apart from the payload."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    control_bytes: int = 0

    def as_dict(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _resolve(work: Any, value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """The future of ``work`` that yields ``value``, and re-raises the work's error (a
    timeout, a closed connection) instead of handing back an unfilled buffer."""

    def _check(fut: torch.futures.Future[Any]) -> torch.Tensor:
        fut.value()  # raises if the collective failed
        return value

    return work.get_future().then(_check)


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
        """Send consecutive slices of ``tensor`` to each rank; receive in rank order."""

    @abstractmethod
    def _broadcast(self, tensor: torch.Tensor, root: int) -> torch.futures.Future[torch.Tensor]:
        """Overwrite ``tensor`` (contiguous, the same size on every rank) with ``root``'s."""

    @abstractmethod
    def _sendrecv(self, send: torch.Tensor, peer: int, recv_numel: int) -> torch.Tensor:
        """Blocking exchange with ``peer``: send ``send`` (skipped when empty) and receive
        ``recv_numel`` elements of the same dtype (skipped when 0)."""

    # Accounted primitives used by the collectives -------------------------------------

    def allgather(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        """All ranks' equal-sized 1-D tensors, concatenated in rank order (payload bytes)."""
        nbytes = tensor.numel() * tensor.element_size()
        self.stats.bytes_sent += (self.size - 1) * nbytes
        self.stats.bytes_received += (self.size - 1) * nbytes
        self.stats.messages += self.size - 1
        return self._allgather_fixed(tensor) if self.size > 1 else completed_future(tensor.clone())

    def allgather_control(self, tensor: torch.Tensor) -> torch.Tensor:
        """Blocking allgather of a small fixed-size header; returns shape (P, len)."""
        out = self._allgather_fixed(tensor).wait() if self.size > 1 else tensor.clone()
        self.stats.control_bytes += (self.size - 1) * tensor.numel() * tensor.element_size()
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
        self.stats.messages += (p - 1) * int(counts[me] > 0)
        if p == 1 or sum(counts) == 0:
            return completed_future(tensor.clone())
        if all(c == counts[0] for c in counts):
            return self._allgather_fixed(tensor)
        # Unequal lengths: gloo's allgather needs equal sizes, and padding would send
        # bytes that carry nothing. An all-to-all with per-peer counts sends exactly the
        # payload, once to every peer.
        return self._alltoall(tensor.repeat(p), [counts[me]] * p, list(counts))

    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.futures.Future[torch.Tensor]:
        """``root``'s contiguous ``tensor`` to every rank, in place; every rank already knows
        its size. Accounted as the binomial tree gloo and MPI run."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast: root must be a rank in [0, {self.size}), got {root}")
        if not tensor.is_contiguous():
            raise ValueError("broadcast: the tensor must be contiguous (it is overwritten in place)")
        nbytes = tensor.numel() * tensor.element_size()
        sends = binomial_sends(self.rank, root, self.size)
        self.stats.bytes_sent += sends * nbytes
        self.stats.bytes_received += nbytes if self.rank != root else 0
        self.stats.messages += sends
        return self._broadcast(tensor, root) if self.size > 1 else completed_future(tensor)

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

    def allreduce_native(self, tensor: torch.Tensor) -> Optional[torch.futures.Future[torch.Tensor]]:
        """The transport's own in-place sum (a ring on gloo), when it has one for this dtype:
        the fastest dense path, identical on every rank, but its bits depend on the
        transport. None when unavailable; callers then use ``allreduce_dense``."""
        fut = self._allreduce_native(tensor)
        if fut is not None:
            moved = ring_allreduce_bytes(tensor.numel(), tensor.element_size(), self.size)
            self.stats.bytes_sent += moved
            self.stats.bytes_received += moved
            self.stats.messages += 2 * (self.size - 1)
        return fut

    def _allreduce_native(self, tensor: torch.Tensor) -> Optional[torch.futures.Future[torch.Tensor]]:
        del tensor
        return None

    def sendrecv(self, send: torch.Tensor, peer: int, recv_numel: int) -> torch.Tensor:
        """Point-to-point exchange with one peer (either direction may be empty)."""
        size = send.element_size()
        self.stats.bytes_sent += send.numel() * size
        self.stats.bytes_received += recv_numel * size
        self.stats.messages += int(send.numel() > 0)
        return self._sendrecv(send.contiguous(), peer, recv_numel)

    def sendrecv_control(self, send: torch.Tensor, peer: int, recv_numel: int) -> torch.Tensor:
        """:meth:`sendrecv` for small headers, counted in ``control_bytes``."""
        self.stats.control_bytes += send.numel() * send.element_size()
        self.stats.messages += int(send.numel() > 0)
        return self._sendrecv(send.contiguous(), peer, recv_numel)


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
                "torch.distributed.init_process_group() first"
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
        return _resolve(work, out)

    def _alltoall(
        self, tensor: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> torch.futures.Future[torch.Tensor]:
        out = torch.empty(sum(recv_counts), dtype=tensor.dtype, device=tensor.device)
        work = dist.all_to_all_single(
            out, tensor.contiguous(), list(recv_counts), list(send_counts), group=self.group, async_op=True
        )
        return _resolve(work, out)

    def _allreduce_native(self, tensor: torch.Tensor) -> Optional[torch.futures.Future[torch.Tensor]]:
        if self.size == 1:
            return completed_future(tensor)
        return _resolve(dist.all_reduce(tensor, group=self.group, async_op=True), tensor)

    def _broadcast(self, tensor: torch.Tensor, root: int) -> torch.futures.Future[torch.Tensor]:
        global_root = root if self.group is None else dist.get_global_rank(self.group, root)
        return _resolve(dist.broadcast(tensor, global_root, group=self.group, async_op=True), tensor)

    def _sendrecv(self, send: torch.Tensor, peer: int, recv_numel: int) -> torch.Tensor:
        recv = torch.empty(recv_numel, dtype=send.dtype, device=send.device)
        global_peer = peer if self.group is None else dist.get_global_rank(self.group, peer)
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send, global_peer, self.group))
        if recv_numel:
            ops.append(dist.P2POp(dist.irecv, recv, global_peer, self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return recv
