"""The demonstration task: scikit-learn's bundled 8x8 handwritten digits (no download)
and two models for it: a small CNN, and a wide MLP with a few million parameters where
bandwidth matters. Used by gradsparse-train, the examples and the tests."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "load_digits_split"]

#: the model names :func:`build_model` accepts
MODELS = ("cnn", "mlp")


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> Tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: the 1,797 digits, standardised, with a fixed
    split. Needs scikit-learn (``pip install 'gradsparse[train]'``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data set needs scikit-learn: pip install 'gradsparse[train]'") from None
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train_idx = order[:n_test], order[n_test:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return x[train_idx], y[train_idx], x[test], y[test]


def build_model(name: str) -> nn.Module:
    """``"cnn"`` (~150k parameters) or ``"mlp"`` (~4.3M parameters: communication-heavy)."""
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 2048),
            nn.ReLU(),
            nn.Linear(2048, 2048),
            nn.ReLU(),
            nn.Linear(2048, 10),
        )
    raise ValueError(f"unknown model {name!r}; expected one of {list(MODELS)}")
