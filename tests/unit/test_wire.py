from typing import List, Optional, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsparse.comm import (
    Backend,
    PayloadError,
    PeerError,
    build,
    completed_future,
)
from gradsparse.comm._common import decode_all
from gradsparse.comm.wire import (
    BITMAP,
    DENSE,
    FLAG_ERROR,
    FLAG_NONFINITE,
    LIST,
    choose_encoding,
    decode,
    encode,
    encoded_bytes,
)
from gradsparse.payload import SparsePayload

VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def payload(indices, values, numel, dtype=torch.float32, index_dtype=torch.int32):
    return SparsePayload(torch.tensor(indices, dtype=index_dtype), torch.tensor(values, dtype=dtype), numel)


def _header(p: SparsePayload, flags: int = 0) -> List[int]:
    vcode = VALUE_DTYPES.index(p.values.dtype)
    icode = [torch.int32, torch.int64].index(p.indices.dtype)
    kind = choose_encoding(p.count, p.numel, p.values.dtype, p.indices.dtype)
    return [
        p.numel,
        p.count,
        vcode,
        icode,
        flags,
        kind,
        encoded_bytes(kind, p.count, p.numel, p.values.dtype, p.indices.dtype),
    ]


class ScriptedBackend(Backend):
    """Rank 0 of a group whose peers' headers and allgather messages the test dictates."""

    def __init__(self, peers: List[SparsePayload], headers: Optional[List[List[int]]] = None) -> None:
        super().__init__()
        self.peers = peers
        self.headers = headers if headers is not None else [_header(p) for p in peers]

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1 + len(self.peers)

    def _messages(self) -> List[torch.Tensor]:
        return [encode(p.indices, p.values, 0, p.numel, h[5]) for p, h in zip(self.peers, self.headers)]

    def _allgather_fixed(self, tensor):
        if tensor.dtype == torch.int64:
            rows = torch.tensor(self.headers, dtype=torch.int64).reshape(-1)
            return completed_future(torch.cat([tensor, rows]))
        return completed_future(torch.cat([tensor, *self._messages()]))

    def _alltoall(self, tensor, send_counts: Sequence[int], recv_counts: Sequence[int]):
        return completed_future(torch.cat([tensor[: send_counts[0]], *self._messages()]))

    def _broadcast(self, tensor, root):
        raise NotImplementedError("the scripted backend plays allgather and alltoall only")

    def _sendrecv(self, send, peer, recv_numel):
        raise NotImplementedError


@settings(max_examples=80, deadline=None)
@given(
    numel=st.integers(1, 300),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(VALUE_DTYPES),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    lo=st.integers(0, 50),
    seed=st.integers(0, 1000),
)
def test_every_encoding_round_trips(numel, density, dtype, index_dtype, lo, seed):
    gen = torch.Generator().manual_seed(seed)
    count = int(density * numel)
    positions = torch.sort(torch.randperm(numel, generator=gen)[:count]).values
    indices = (positions + lo).to(index_dtype)
    values = (torch.randn(count, generator=gen) + 3.0).to(dtype)  # nonzero, so DENSE keeps them
    for kind in (LIST, BITMAP, DENSE):
        buf = encode(indices, values, lo, numel, kind)
        assert buf.numel() == encoded_bytes(kind, count, numel, dtype, index_dtype)
        msg = decode(buf, kind, count, lo, numel, lo + numel, dtype, index_dtype)
        if kind == DENSE:
            expected = torch.zeros(numel, dtype=dtype)
            expected[positions] = values
            assert torch.equal(msg.dense, expected)
        else:
            assert torch.equal(msg.sparse.indices.long(), indices.long())
            assert torch.equal(msg.sparse.values, values)


def test_encoding_choice_is_the_smallest():
    n = 1 << 20
    assert choose_encoding(100, n, torch.float32, torch.int32) == LIST  # 800 B vs 128 KiB bitmap
    assert choose_encoding(n // 16, n, torch.float32, torch.int32) == BITMAP  # 128K+256K vs 512K
    assert choose_encoding(n // 2, n, torch.float32, torch.int32) == BITMAP  # 2.125 n vs 4 n bytes
    assert choose_encoding(n - n // 64, n, torch.float32, torch.int32) == DENSE
    for count in (0, 1, 1000, 40000, n // 4, n):
        sizes = {k: encoded_bytes(k, count, n, torch.float32, torch.int32) for k in (LIST, BITMAP, DENSE)}
        assert sizes[choose_encoding(count, n, torch.float32, torch.int32)] == min(sizes.values())


@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("counts", [[0, 3], [1, 2, 5], [7, 0, 0]])
def test_index_list_messages_of_all_ranks_round_trip(dtype, index_dtype, counts):
    numel = 50
    parts = [
        SparsePayload(torch.sort(torch.randperm(numel)[:c]).values.to(index_dtype), torch.randn(c).to(dtype), numel)
        for c in counts
    ]
    buf = torch.cat([encode(p.indices, p.values, 0, numel, LIST) for p in parts])
    assert buf.numel() == sum(encoded_bytes(LIST, c, numel, dtype, index_dtype) for c in counts)
    kinds = [LIST] * len(counts)
    decoded = decode_all(buf, counts, [(0, numel)] * len(counts), numel, dtype, index_dtype, kinds)
    for got, want in zip(decoded, parts):
        assert torch.equal(got.sparse.indices, want.indices) and torch.equal(got.sparse.values, want.values)


def test_truncated_or_corrupt_messages_are_rejected():
    p = payload([1, 2], [1.0, 2.0], 10)
    with pytest.raises(PayloadError, match="message of 8 bytes, expected 16"):
        decode(encode(p.indices, p.values, 0, 10, LIST)[:8], LIST, 2, 0, 10, 10, torch.float32, torch.int32)
    bitmap = encode(p.indices, p.values, 0, 10, BITMAP)[:8]  # two bits set
    forged = torch.cat([bitmap, torch.zeros(16, dtype=torch.uint8)])  # sized for three values
    with pytest.raises(PayloadError, match="bitmap holds 2 entries, the header says 3"):
        decode(forged, BITMAP, 3, 0, 10, 10, torch.float32, torch.int32)


def test_allgather_sum_is_exact_and_in_rank_order():
    mine = payload([0, 3], [1.0, 2.0], 6)
    peers = [payload([3, 5], [0.5, -1.0], 6), payload([], [], 6)]
    reduced = build("allgather").reduce(mine, ScriptedBackend(peers)).wait()
    assert reduced.counts == (2, 2, 0)
    assert reduced.write(torch.empty(6)).tolist() == [1.0, 0.0, 0.0, 2.5, 0.0, -1.0]


def test_allgather_accounting_matches_formula():
    k, p = 10, 4
    mk = lambda: SparsePayload(torch.arange(k, dtype=torch.int32) * 7, torch.ones(k), 1000)  # noqa: E731
    backend = ScriptedBackend([mk() for _ in range(p - 1)])
    build("allgather").reduce(mk(), backend).wait()
    assert backend.stats.bytes_sent == (p - 1) * 8 * k
    assert backend.stats.bytes_received == (p - 1) * 8 * k
    assert backend.stats.control_bytes == (p - 1) * 7 * 8


def test_mismatched_numel_is_refused():
    backend = ScriptedBackend([payload([1], [1.0], 11)])
    with pytest.raises(PayloadError, match=r"numel differs across ranks: \[10, 11\]"):
        build("allgather").reduce(payload([1], [1.0], 10), backend)


@pytest.mark.parametrize(
    "row,match",
    [
        ([10, -1, 0, 0, 0, 0, 0], "rank 1 announced -1 entries"),
        ([10, 11, 0, 0, 0, 0, 88], "rank 1 announced 11 entries for a tensor of 10"),
        ([10, 1, 9, 0, 0, 0, 8], "unknown dtype codes"),
        ([10, 1, 0, 0, 64, 0, 8], "unknown flags"),
        ([10, 1, 0, 0, 0, 7, 8], "unknown encoding 7"),
        ([10, 1, 0, 0, 0, 0, -8], "negative message size"),
        ([10, 1, 1, 0, 0, 0, 16], "dtypes differ"),
    ],
)
def test_malformed_peer_header_is_refused(row, match):
    mine = payload([1], [1.0], 10)
    backend = ScriptedBackend([payload([1], [1.0], 10)], headers=[row])
    with pytest.raises(PayloadError, match=match):
        build("allgather").reduce(mine, backend)


def test_announced_size_must_match_the_encoding():
    peer = payload([1], [1.0], 10)
    row = _header(peer)
    row[6] += 8
    with pytest.raises(PayloadError, match="rank 1 announced 24 bytes for 1 entries"):
        build("allgather").reduce(payload([0], [1.0], 10), ScriptedBackend([peer], headers=[row]))


def test_peer_index_out_of_range_is_refused():
    bad = payload([3, 12], [1.0, 1.0], 10)  # numel says 10, index 12
    backend = ScriptedBackend([payload([1], [1.0], 10), bad])
    # Raised inside Future.then, so it arrives wrapped in the future's RuntimeError.
    with pytest.raises((PayloadError, RuntimeError), match=r"rank\(s\) \[2\] sent a bad message.*outside \[0, 10\)"):
        build("allgather").reduce(payload([0], [1.0], 10), backend).wait()


def test_peer_failure_flag_raises_peer_error():
    p = payload([1], [1.0], 10)
    backend = ScriptedBackend([p], headers=[_header(p, FLAG_ERROR)])
    with pytest.raises(PeerError, match=r"rank\(s\) \[1\] failed"):
        build("allgather").reduce(p, backend)


def test_nonfinite_flag_poisons_the_result_everywhere():
    p = payload([1], [1.0], 4)
    backend = ScriptedBackend([p], headers=[_header(p, FLAG_NONFINITE)])
    out = build("allgather").reduce(p, backend).wait().write(torch.empty(4))
    assert bool(torch.isnan(out).all())


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            SparsePayload(torch.tensor([0], dtype=torch.int16), torch.ones(1), 4),
            r"must be int32 or int64, got torch\.int16",
        ),
        (payload([2, 1], [1.0, 1.0], 4), "sorted ascending and unique"),
        (payload([1, 1], [1.0, 1.0], 4), "sorted ascending and unique"),
        (payload([0, 9], [1.0, 1.0], 4), r"indices must lie in \[0, 4\)"),
        (SparsePayload(torch.tensor([0, 1], dtype=torch.int32), torch.ones(3), 4), "2 indices but 3 values"),
    ],
)
def test_a_bad_local_payload_is_refused_after_telling_the_peers(bad, match):
    backend = ScriptedBackend([payload([1], [1.0], 4)])
    with pytest.raises(PayloadError, match=match):
        build("allgather").reduce(bad, backend)
    assert backend.stats.control_bytes > 0  # the header (with FLAG_ERROR) went out first


def test_unknown_collective_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown collective 'ring'; expected one of \['allgather', 'auto'"):
        build("ring")


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7, 8, 16])
def test_binomial_broadcast_sends_each_copy_once(world):
    from gradsparse.comm import binomial_sends

    for root in range(world):
        sends = [binomial_sends(r, root, world) for r in range(world)]
        assert sum(sends) == world - 1  # every rank but the root receives one copy
        assert sends[root] == max(0, (world - 1).bit_length())  # the root: ceil(log2 P)
