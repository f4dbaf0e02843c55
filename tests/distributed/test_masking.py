"""Weight masks with the hook on real gloo ranks."""

import torch
from torch import nn

import gradsparse as gs
from gradsparse.masking import WeightMasker

from .harness import gather_all, run_distributed


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 256, bias=False),
        nn.ReLU(),
        nn.Linear(256, 256, bias=False),
        nn.ReLU(),
        nn.Linear(256, 10, bias=False),
    )


def _batch(rank, step):
    gen = torch.Generator().manual_seed(rank * 1000 + step)
    x = torch.randn(16, 32, generator=gen)
    return x, (x[:, :10]).argmax(1)


def _masks_consistent(rank, world):
    results = {}
    for criterion, compressor, params in (
        ("rigl", "topk", {"density": 0.05}),
        ("set", "sampled_topk", {"density": 0.05}),
        ("magnitude", "none", {}),
        ("rigl", "topk", {"density": 0.05, "collective": "shared_topk"}),  # the leader selects among active weights
        ("rigl", "sign", {}),  # blocks of each weight's active entries, remade as the masks regrow
    ):
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        masker = WeightMasker(
            model, 0.8, criterion=criterion, schedule="gradual", start_step=0, end_step=20, frequency=5, regrow_every=7
        )
        state = gs.register_sparse_hook(ddp, compressor, **params, masker=masker)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for step in range(60):
            x, y = _batch(rank, step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            masker.step(opt)
            losses.append(loss.item())
            for name, mask in masker.masks.items():
                copies = gather_all(mask.to(torch.uint8))
                assert all(torch.equal(copies[0], c) for c in copies), f"{criterion}: masks differ at {step} ({name})"
                assert bool((masker.params[name].detach()[~mask] == 0).all())
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        copies = gather_all(flat)
        assert all(torch.equal(copies[0], c) for c in copies), f"{criterion}: replicas differ"
        results[f"{criterion}/{compressor}/{params.get('collective', 'allgather')}"] = (
            masker.global_sparsity(),
            sum(losses[:5]) / 5,
            sum(losses[-5:]) / 5,
            state.stats(),
        )
    return results


def test_masks_stay_identical_on_4_ranks_and_training_works():
    results = run_distributed(_masks_consistent, 4)[0]
    for criterion, (sparsity, first, last, _) in results.items():
        assert abs(sparsity - 0.8) < 0.01, criterion
        assert last < first, f"{criterion}: loss did not fall"


def _bytes_at_90(rank, world):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    masker = WeightMasker(model, 0.9)
    state = gs.register_sparse_hook(ddp, "none", masker=masker)
    plain = gs.register_sparse_hook(nn.parallel.DistributedDataParallel(_model()), "none")
    for step in range(3):
        x, y = _batch(rank, step)
        nn.functional.cross_entropy(ddp(x), y).backward()
    return state.stats(), plain.stats()


def test_bytes_with_masks_at_90_percent_are_10_percent_of_dense():
    masked, _ = run_distributed(_bytes_at_90, 4)[0]
    ratio = masked["bytes_sent"] / masked["dense_bytes"]
    assert 0.095 < ratio < 0.105, ratio  # values of active weights only: no indices, no bitmap
