from typing import List, Optional, Sequence

import pytest
import torch

from gradsparse.comm import (
    FLAG_ERROR,
    FLAG_NONFINITE,
    Backend,
    PayloadError,
    PeerError,
    build,
    completed_future,
)
from gradsparse.comm.wire import Headers, pack, segment_bytes, unpack
from gradsparse.payload import SparsePayload


def payload(indices, values, numel, dtype=torch.float32, index_dtype=torch.int32):
    return SparsePayload(torch.tensor(indices, dtype=index_dtype), torch.tensor(values, dtype=dtype), numel)


class ScriptedBackend(Backend):
    """Rank 0 of a group whose peers' headers and messages the test dictates."""

    def __init__(self, peers: List[SparsePayload], headers: Optional[List[List[int]]] = None) -> None:
        super().__init__()
        self.peers = peers
        self.headers = headers

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1 + len(self.peers)

    def _allgather_fixed(self, tensor):
        if tensor.dtype == torch.int64 and tensor.numel() == 5 and self.headers is not None:
            return completed_future(
                torch.cat([tensor, torch.tensor(self.headers, dtype=torch.int64).reshape(-1)])
            )
        if tensor.dtype == torch.int64 and tensor.numel() == 5:
            rows = [tensor] + [_header(p) for p in self.peers]
            return completed_future(torch.cat(rows))
        return completed_future(torch.cat([tensor] + [pack(p) for p in self.peers]))

    def _alltoall(self, tensor, send_counts: Sequence[int], recv_counts: Sequence[int]):
        mine = tensor[: send_counts[0]]
        return completed_future(torch.cat([mine] + [pack(p) for p in self.peers]))

    def _allreduce_sum(self, tensor):
        for p in self.peers:
            tensor.add_(p.to_dense())
        return completed_future(tensor)


def _header(p: SparsePayload, flags: int = 0) -> torch.Tensor:
    vcode = [torch.float32, torch.float16, torch.bfloat16, torch.float64].index(p.values.dtype)
    icode = [torch.int32, torch.int64].index(p.indices.dtype)
    return torch.tensor([p.numel, p.count, vcode, icode, flags], dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("counts", [[0, 3], [1, 2, 5], [7, 0, 0]])
def test_pack_unpack_round_trip(dtype, index_dtype, counts):
    numel = 50
    parts = [
        SparsePayload(torch.randperm(numel)[:c].to(index_dtype), torch.randn(c).to(dtype), numel)
        for c in counts
    ]
    buf = torch.cat([pack(p) for p in parts])
    assert buf.numel() == sum(segment_bytes(c, dtype, index_dtype) for c in counts)
    headers = Headers(numel, counts, [0] * len(counts), dtype, index_dtype)
    for got, want in zip(unpack(buf, counts, headers), parts):
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def test_truncated_buffer_is_rejected():
    p = payload([1, 2], [1.0, 2.0], 10)
    headers = Headers(10, [2], [0], torch.float32, torch.int32)
    with pytest.raises(PayloadError, match="received 8 bytes, expected 16"):
        unpack(pack(p)[:8], [2], headers)


@pytest.mark.parametrize("name", ["allgather", "dense"])
def test_sum_is_exact_and_in_rank_order(name):
    mine = payload([0, 3], [1.0, 2.0], 6)
    peers = [payload([3, 5], [0.5, -1.0], 6), payload([], [], 6)]
    backend = ScriptedBackend(peers)
    reduced = build(name).reduce(mine, backend).wait()
    assert reduced.to_dense(torch.float32, torch.device("cpu")).tolist() == [1.0, 0.0, 0.0, 2.5, 0.0, -1.0]


def test_allgather_accounting_matches_formula():
    k, p = 10, 4
    mk = lambda: SparsePayload(torch.arange(k, dtype=torch.int32), torch.ones(k), 100)  # noqa: E731
    backend = ScriptedBackend([mk() for _ in range(p - 1)])
    build("allgather").reduce(mk(), backend).wait()
    assert backend.stats.bytes_sent == (p - 1) * 8 * k
    assert backend.stats.bytes_received == (p - 1) * 8 * k
    assert backend.stats.control_bytes == (p - 1) * 5 * 8


def test_dense_accounting_matches_ring_formula():
    n, p = 1000, 4
    backend = ScriptedBackend([payload([], [], n) for _ in range(p - 1)])
    build("dense").reduce(payload([1], [1.0], n), backend).wait()
    assert backend.stats.bytes_sent == 2 * (p - 1) * 4 * n // p


def test_mismatched_numel_is_refused():
    backend = ScriptedBackend([payload([1], [1.0], 11)])
    with pytest.raises(PayloadError, match=r"numel differs across ranks: \[10, 11\]"):
        build("allgather").reduce(payload([1], [1.0], 10), backend)


@pytest.mark.parametrize(
    "row,match",
    [
        ([10, -1, 0, 0, 0], "rank 1 announced -1 entries"),
        ([10, 11, 0, 0, 0], "rank 1 announced 11 entries for a tensor of 10"),
        ([10, 1, 9, 0, 0], "unknown dtype codes"),
        ([10, 1, 0, 0, 64], "unknown flags"),
        ([10, 1, 1, 0, 0], "dtypes differ"),
    ],
)
def test_malformed_peer_header_is_refused(row, match):
    mine = payload([1], [1.0], 10)
    backend = ScriptedBackend([payload([1], [1.0], 10)], headers=[row])
    with pytest.raises(PayloadError, match=match):
        build("allgather").reduce(mine, backend)


def test_peer_index_out_of_range_is_refused():
    bad = payload([3, 12], [1.0, 1.0], 10)  # numel says 10, index 12
    backend = ScriptedBackend([payload([1], [1.0], 10), bad])
    # Raised inside Future.then, so it arrives wrapped in the future's RuntimeError.
    with pytest.raises(
        (PayloadError, RuntimeError), match=r"PayloadError: rank\(s\) \[2\] sent indices outside \[0, 10\)"
    ):
        build("allgather").reduce(payload([0], [1.0], 10), backend).wait()


def test_peer_failure_flag_raises_peer_error():
    p = payload([1], [1.0], 10)
    backend = ScriptedBackend([p], headers=[_header(p, FLAG_ERROR).tolist()])
    with pytest.raises(PeerError, match=r"rank\(s\) \[1\] failed"):
        build("allgather").reduce(p, backend)


def test_nonfinite_flag_poisons_the_result_everywhere():
    p = payload([1], [1.0], 4)
    backend = ScriptedBackend([p], headers=[_header(p, FLAG_NONFINITE).tolist()])
    out = build("allgather").reduce(p, backend).wait().to_dense(torch.float32, torch.device("cpu"))
    assert bool(torch.isnan(out).all())


def test_unsupported_dtype_is_refused():
    p = SparsePayload(torch.tensor([0], dtype=torch.int16), torch.ones(1), 4)
    with pytest.raises(PayloadError, match=r"indices dtype torch\.int16 is not supported"):
        build("allgather").reduce(p, ScriptedBackend([]))


def test_unknown_collective_lists_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown collective 'ring'; expected one of \['allgather', 'dense'\]"
    ):
        build("ring")
