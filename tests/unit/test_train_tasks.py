"""gradsparse-train's models and data, its baselines, and how converge reads a run."""

import math

import pytest
import torch

from gradsparse.baselines import baseline_bytes, check_baseline
from gradsparse.bench.converge import SETTINGS, converge_table, mean_curves, time_to
from gradsparse.comm import ring_allreduce_bytes
from gradsparse.train.config import UsageError, parse_config
from gradsparse.train.tasks import TASKS, get_task, load_mnist_split


def test_mnist_split_is_balanced_disjoint_and_standardised():
    data = load_mnist_split()
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_val.shape == (1000, 1, 28, 28)
    assert torch.bincount(data.y_val, minlength=10).tolist() == [100] * 10
    assert torch.bincount(data.y_train, minlength=10).tolist() == [400] * 10
    assert abs(float(data.x_train.mean())) < 1e-3 and abs(float(data.x_train.std()) - 1) < 1e-3
    # no held-out image is also a training image
    train = {hash(x.numpy().tobytes()) for x in data.x_train}
    assert not any(hash(x.numpy().tobytes()) in train for x in data.x_val)


def test_text_windows_predict_the_next_character_and_hold_out_the_tail():
    task = get_task("chargpt")
    data = task.load()
    assert data.x_train.shape[1] == data.y_train.shape[1] == 64
    flat_x, flat_y = data.x_train.reshape(-1), data.y_train.reshape(-1)
    assert torch.equal(flat_x[1:], flat_y[:-1])  # non-overlapping windows, shifted by one
    assert data.x_val.shape == (1280, 64) and torch.equal(data.x_val[:, 1:], data.y_val[:, :-1])
    model = task.build()
    out = model(data.x_val[:2])
    assert out.shape == (2, 64, 63)  # the King James text's 63 symbols
    first = float(task.loss(out, data.y_val[:2]))
    assert abs(first - math.log(63)) < 0.2  # GPT-2's initialisation: about a uniform guess at first
    metrics = task.evaluate(model, data)
    assert set(metrics) == {"val_loss", "perplexity"}
    assert math.isclose(metrics["perplexity"], math.exp(min(metrics["val_loss"], 50.0)), rel_tol=1e-9)
    assert not task.higher_is_better and task.better(1.0, 1.5) and not task.better(2.0, 1.5)


def test_an_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"`model` to be one of \['chargpt', 'cnn', 'mlp', 'mnist_cnn'\].*'gpt'"):
        get_task("gpt")
    assert set(TASKS) == {"chargpt", "cnn", "mlp", "mnist_cnn"}


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("bf16", {"baseline": "bf16", "compressor": None}),
        ("powersgd", {"baseline": "powersgd1"}),
        ("powersgd:4", {"baseline": "powersgd4"}),
        ("noop", {"baseline": "noop"}),
        ("topk:0.01@shared_topk", {"compressor": "topk", "collective": "shared_topk", "params": {"density": 0.01}}),
        ("topk:0.01@auto+noef", {"collective": "auto", "error_feedback": False, "sign_steps": None}),
        ("topk:0.01+nosigns", {"error_feedback": True, "sign_steps": 0}),
        ("topk:0.01+noef+nosigns", {"error_feedback": False, "sign_steps": 0}),
        ("topk:0.01", {"collective": None, "baseline": None, "sign_steps": None}),
        ("topk:0.01+signs=100", {"sign_steps": 100}),
        ("topk:0.01@shared_topk+signs=0", {"collective": "shared_topk", "sign_steps": 0}),
    ],
)
def test_compare_configurations_name_baselines_and_collectives(spec, expected):
    run = parse_config(spec)
    assert run.label == spec
    for key, value in expected.items():
        assert getattr(run, key) == value, key


@pytest.mark.parametrize(
    "spec,message",
    [
        ("bf16:2", "'bf16' takes no value, collective or flag"),
        ("bf16+nosigns", "'bf16' takes no value, collective or flag"),
        ("topk:0.01+signs", "unknown flag '+signs' (allowed: noef, nosigns, signs=N)"),
        ("topk:0.01+signs=ten", "+signs=N takes a count of steps, got 'ten'"),
        ("topk:0.01+signs=-1", "+signs=N takes a count of steps, got '-1'"),
        ("topk:0.01+nosigns+signs=5", "give one of +nosigns and +signs=N"),
        ("bf16+signs=5", "'bf16' takes no value, collective or flag"),
        ("powersgd:0", "PowerSGD's rank must be a positive integer, got '0'"),
        ("powersgd:1@allgather", "takes no value, collective or flag"),
        ("topk:0.01@ring", "unknown collective 'ring'; expected one of ["),
        ("bf32", "unknown compressor 'bf32'; expected one of ['dense', 'noop', 'bf16', 'fp16', 'powersgd'"),
    ],
)
def test_bad_configurations_say_what_is_allowed(spec, message):
    with pytest.raises(UsageError) as err:
        parse_config(spec)
    assert message in str(err.value)


def test_baseline_bytes_follow_each_algorithm():
    params = [torch.zeros(64, 32, requires_grad=True), torch.zeros(32, requires_grad=True)]
    dense = ring_allreduce_bytes(64 * 32 + 32, 4, 4)
    assert baseline_bytes("ddp", params, 4) == dense
    assert baseline_bytes("bf16", params, 4) == ring_allreduce_bytes(64 * 32 + 32, 2, 4)
    assert baseline_bytes("noop", params, 4) == 0
    # PowerSGD rank 2: P (64x2) and Q (32x2) for the matrix, the vector as it is
    expected = ring_allreduce_bytes(2 * (64 + 32), 4, 4) + ring_allreduce_bytes(32, 4, 4)
    assert baseline_bytes("powersgd2", params, 4) == expected
    with pytest.raises(ValueError, match=r"'powersgd<RANK>'.*'powersgd0'"):
        check_baseline("powersgd0")


def test_the_settings_arithmetic():
    a100 = SETTINGS["a100-25gbe"]
    assert math.isclose(a100.compute_s, 6 * 124e6 * 8192 / (0.4 * 312e12))
    assert math.isclose(a100.allreduce_s, 2 * 3 / 4 * 4 * 124e6 * 8 / 25e9)
    assert math.isclose(SETTINGS["a100-10gbe"].ratio, 2.5 * a100.ratio)
    assert "ratio 4.9" in a100.describe()


def _rows(label, losses, seconds_per_step, seeds=(0, 1)):
    rows = []
    for seed in seeds:
        for i, loss in enumerate(losses):
            step = 10 * (i + 1)
            rows.append({"config": label, "seed": seed, "step": step, "seconds": seconds_per_step * step,
                         "mb_sent": step * 0.5, "val_loss": loss + 0.01 * seed})  # fmt: skip
    return rows


def test_time_to_quality_reads_the_mean_curve_and_says_not_reached():
    rows = _rows("dense", [3.0, 2.0, 1.5], 1.0) + _rows("topk:0.01", [2.5, 1.6, 1.4], 0.25)
    rows += _rows("bf16", [3.0, 2.0, 1.52], 0.5) + _rows("sign", [3.0, 2.5, 1.9], 0.2)
    curves = mean_curves(rows, "val_loss")
    assert [p["val_loss"] for p in curves["dense"]] == pytest.approx([3.005, 2.005, 1.505])
    target = curves["dense"][-1]["val_loss"]
    assert time_to(curves["dense"], "val_loss", target, higher=False) == 30.0
    assert time_to(curves["topk:0.01"], "val_loss", target, higher=False) == 7.5  # reached at step 30
    assert time_to(curves["bf16"], "val_loss", target, higher=False) is None
    table = converge_table(rows, "val_loss", 0.02)
    line = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table.splitlines()[2:]}
    assert line["topk:0.01"][3:6] == ["7.5 s", "4.00x", "-"]  # bf16 never reached: no baseline to compare
    assert line["bf16"][3] == "not reached" and line["bf16"][6] == "15.0 s"  # within 2% of 1.505
    assert line["sign"][3] == "not reached" and line["sign"][6] == "not reached"
    assert line["dense"][0] == "1.505 ± 0.007"
