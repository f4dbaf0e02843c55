import logging

import pytest

from gradsparse.comm import AutoCollective, LinkModel, SparseCost, predict
from gradsparse.launch import detect_launcher

MEMORY = 8e9  # one read+write pass: about 5 ms for 25M floats, as measured here
N = 25_000_000


class _Backend:
    def __init__(self, size):
        self.size, self.rank = size, 0


def _auto(gbit, latency=50e-6):
    return AutoCollective(latency_s=latency, bandwidth_Bps=gbit * 1e9 / 8, memory_Bps=MEMORY)


# local_passes: selection (6) plus the hook's own passes (policy.HOOK_PASSES, 12)
def test_dense_on_a_fast_link_sparse_on_a_slow_one():
    k = N // 100
    assert _auto(100).prefers_dense(
        _Backend(4), SparseCost(N, k, 4, local_passes=18)
    )  # 100 Gbit/s: selection costs more
    assert not _auto(1).prefers_dense(_Backend(4), SparseCost(N, k, 4, local_passes=18))  # 1 Gbit/s: 1% pays


def test_dense_at_high_density():
    # Near full density the bytes saved no longer pay for selection, even at 1 Gbit/s.
    assert _auto(1).prefers_dense(_Backend(4), SparseCost(N, N * 95 // 100, 4, local_passes=18))
    # At 30% on 10 Gbit/s, split-allgather's saving (bitmap encoding) is smaller than selection.
    assert _auto(10).prefers_dense(_Backend(4), SparseCost(N, N * 3 // 10, 4, local_passes=18))
    # At 50% on 1 Gbit/s a bitmap-encoded reduce-scatter sends fewer bytes than dense, but
    # decoding millions of entries costs more than the bytes save (as measured).
    assert _auto(1).prefers_dense(_Backend(4), SparseCost(N, N // 2, 4, local_passes=18))


def test_choice_follows_the_formulas():
    auto = _auto(1)

    class H:
        numel = N
        value_dtype = __import__("torch").float32

    small = H()
    small.counts = [N // 1000] * 2
    assert auto.choose(small) in ("allgather", "recursive_doubling")  # two ranks: one exchange either way
    many = H()
    many.counts = [N // 100] * 8
    assert auto.choose(many) in ("split_allgather", "dense")  # allgather's 7x volume loses
    model = LinkModel(50e-6, 1e9 / 8 * 0.1, MEMORY)
    counts = [N // 100] * 8
    assert predict(model, "split_allgather", counts, N, 4) < predict(model, "allgather", counts, N, 4)


def test_auto_arguments_are_validated():
    with pytest.raises(ValueError, match="give all of"):
        AutoCollective(latency_s=1e-5)
    with pytest.raises(ValueError, match="`bandwidth_Bps`"):
        AutoCollective(1e-5, -1.0, 1e9)
    with pytest.raises(ValueError, match="candidates"):
        AutoCollective(candidates=["ring"])


@pytest.mark.parametrize(
    "env,launcher,rank,size,local",
    [
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, "torchrun", 1, 4, 1),
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
            "openmpi",
            2,
            4,
            0,
        ),
        ({"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "3"}, "pmi", 3, 8, 3),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1"}, "slurm", 5, 6, 1),
    ],
)
def test_launchers_are_recognised(env, launcher, rank, size, local):
    info = detect_launcher(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == (launcher, rank, size, local)


def test_no_launcher_lists_what_was_looked_for():
    with pytest.raises(RuntimeError, match=r"OMPI_COMM_WORLD_RANK.*PMI_RANK.*SLURM_PROCID"):
        detect_launcher({})


def test_inconsistent_environment_is_refused():
    with pytest.raises(ValueError, match="inconsistent"):
        detect_launcher({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be an integer"):
        detect_launcher({"RANK": "one", "WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    "env,warns",
    [
        ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}, True),
        ({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_MAX_RESTARTS": "3"}, False),
        ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "0"}, False),
        ({}, False),
    ],
)
def test_restarts_into_torchruns_shared_store_are_warned_about(env, warns, caplog):
    from gradsparse.launch import _warn_shared_elastic_store

    with caplog.at_level(logging.WARNING, logger="gradsparse.launch"):
        assert _warn_shared_elastic_store(env) is warns
    assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text) is warns


def test_cluster_ranks_may_have_links_of_their_own():
    from gradsparse.bench.cluster import Cluster

    cluster = Cluster(4, "1gbit", slow=((3, "100mbit"),))
    assert [cluster.rate_of(r) for r in range(4)] == ["1gbit", "1gbit", "1gbit", "100mbit"]
    with pytest.raises(ValueError, match=r"slow rank in \[0, 4\), but got 4"):
        Cluster(4, "1gbit", slow=((4, "100mbit"),))
    with pytest.raises(ValueError, match="link rate like"):
        Cluster(4, "1gbit", slow=((1, "fast"),))
    with pytest.raises(ValueError, match="rank"):
        Cluster(2, "1gbit").set_link(2, up=False)
