import math

import pytest
import torch
from torch import nn

from gradsparse.masking import WeightMasker, prunable_parameters


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def test_weights_and_kernels_are_prunable_biases_and_norms_are_not():
    assert [n for n, _ in prunable_parameters(model())] == ["0.weight", "4.weight", "6.weight"]


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_zero_one_is_refused(sparsity):
    with pytest.raises(ValueError, match=r"`sparsity` to be a float in \[0, 1\)"):
        WeightMasker(model(), sparsity)


def test_unknown_parameter_name_is_refused():
    with pytest.raises(ValueError, match=r"\['4.wieght'\] do not exist.*prunable ones are"):
        WeightMasker(model(), 0.5, names=["4.wieght"])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="`criterion`"):
        WeightMasker(model(), 0.5, criterion="random")
    with pytest.raises(ValueError, match="`end_step`"):
        WeightMasker(model(), 0.5, schedule="gradual", start_step=10, end_step=5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_one_shot_magnitude_pruning(scope):
    m = model()
    original = {n: p.detach().clone() for n, p in m.named_parameters()}
    masker = WeightMasker(m, 0.9, scope=scope)
    report = masker.sparsity_report()
    assert abs(report["global"] - 0.9) < 0.01
    if scope == "layer":
        for name, p in masker.params.items():
            assert report[name] == pytest.approx(math.floor(0.9 * p.numel()) / p.numel())
    kept = {n: original[n][masker.masks[n]].abs() for n in masker.masks}
    pruned = {n: original[n][~masker.masks[n]].abs() for n in masker.masks}
    for name, p in masker.params.items():
        assert bool((p.detach()[~masker.masks[name]] == 0).all())  # applied to the weights
        if scope == "layer":  # within a layer, what survives is larger than what was pruned
            assert float(kept[name].min()) >= float(pruned[name].max())
    if scope == "global":
        assert min(float(k.min()) for k in kept.values()) >= max(float(v.max()) for v in pruned.values())


def test_gradual_schedule_is_cubic_and_reaches_its_target():
    m = model()
    masker = WeightMasker(m, 0.8, schedule="gradual", start_step=10, end_step=110, frequency=10)
    assert masker.target_sparsity(0) == 0.0 and masker.target_sparsity(10) == 0.0
    assert masker.target_sparsity(60) == pytest.approx(0.8 * (1 - 0.5**3))
    assert masker.target_sparsity(110) == pytest.approx(0.8)
    seen = []
    for _ in range(120):
        masker.step()
        seen.append(masker.global_sparsity())
    assert seen == sorted(seen)  # only grows
    assert abs(seen[-1] - 0.8) < 0.01


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
    ],
)
def test_masked_weights_stay_zero_after_100_steps(make_opt):
    m = model()
    masker = WeightMasker(m, 0.9, criterion="set", regrow_every=10)
    opt = make_opt(m.parameters())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        masker.step(opt)
        for name, p in masker.params.items():
            assert bool((p.detach()[~masker.masks[name]] == 0).all()), name
            for value in opt.state[p].values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert bool((value[~masker.masks[name]] == 0).all())


@pytest.mark.parametrize("criterion", ["rigl", "set"])
def test_regrowth_keeps_density_constant_and_moves_weights(criterion):
    m = model()
    masker = WeightMasker(m, 0.7, criterion=criterion, regrow_every=5, regrow_fraction=0.3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = {n: mask.clone() for n, mask in masker.masks.items()}
    counts = {n: int(mask.sum()) for n, mask in masker.masks.items()}
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        masker.step(opt)
        assert {n: int(mask.sum()) for n, mask in masker.masks.items()} == counts
    assert any(not torch.equal(before[n], masker.masks[n]) for n in before)


def test_rigl_grows_where_the_gradient_is_largest():
    lin = nn.Linear(4, 4, bias=False)
    masker = WeightMasker(nn.Sequential(lin), 0.5, criterion="rigl", regrow_every=1, regrow_fraction=0.5)
    inactive = (~masker.masks["0.weight"]).nonzero()
    target = tuple(inactive[0].tolist())
    lin.weight.grad = torch.zeros(4, 4)
    lin.weight.grad[target] = 100.0
    assert masker.needs_dense_gradients()
    masker.step()
    assert bool(masker.masks["0.weight"][target])
    assert float(lin.weight.detach()[target]) == 0.0  # grown weights start at zero


def test_state_dict_round_trip_and_export():
    m = model()
    masker = WeightMasker(m, 0.75, scope="global")
    other = WeightMasker(model(), 0.0)
    other.load_state_dict(masker.state_dict())
    assert all(torch.equal(other.masks[n], masker.masks[n]) for n in masker.masks)
    with pytest.raises(ValueError, match="not a WeightMasker state_dict"):
        other.load_state_dict({"masks": {}})
    pruned, report = masker.export(m, to_sparse=True)
    assert pruned["4.weight"].is_sparse
    assert pruned["4.weight"]._nnz() == int(masker.masks["4.weight"].sum())
    assert not pruned["4.bias"].is_sparse
    assert report["global"] == pytest.approx(0.75, abs=0.01)
