"""Model layouts for ``gradsparse-bench run --model``: whole training steps of real
architectures with synthetic data, sized for CPU ranks (tens of millions of parameters).

* ``resnet``: a ResNet-34-style CNN (basic blocks 3-4-6-3, widths 64-512, batch norm) on
  CIFAR-sized 32x32 images, 10 classes: 21.3M parameters in 110 tensors, most of them in
  3x3 convolutions.
* ``gpt2``: a GPT-2-shaped decoder (pre-LayerNorm blocks, causal self-attention, a 4x GELU
  MLP, learned positions, the output head tied to the token embedding): 8 layers of width
  512, 8 heads, a 16k vocabulary and 64-token sequences: 33.7M parameters, a quarter of
  them in the embedding.

What a user learns from them is how the hook does on DDP's own buckets (25 MB by default,
the first one 1 MB), with many small tensors (biases, norms) that stay dense, and with the
backward pass overlapping communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

__all__ = ["MODELS", "ModelSpec", "parameter_count"]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks, CIFAR stem (one 3x3 convolution, no pooling)."""

    def __init__(self, blocks: Tuple[int, ...] = (3, 4, 6, 3), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers: List[nn.Module] = []
        cin = 64
        for stage, count in enumerate(blocks):
            cout = 64 * 2**stage
            for i in range(count):
                layers.append(_BasicBlock(cin, cout, 2 if stage and not i else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class _DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-shaped decoder-only transformer with a tied output head."""

    def __init__(self, vocab: int = 16384, context: int = 64, width: int = 512, layers: int = 8, heads: int = 8):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_DecoderBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.mask: torch.Tensor
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        for module in self.modules():  # GPT-2's initialisation: small weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(n, device=ids.device))
        for block in self.blocks:
            x = block(x, self.mask[:n, :n])
        return self.ln_f(x) @ self.tokens.weight.t()  # the head is the embedding, tied


@dataclass(frozen=True)
class ModelSpec:
    """A model, its synthetic batches and its loss."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]]  # (rank, step) -> inputs, targets
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    samples: int  # samples per rank and step


def _images(rank: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    return torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def _text(rank: int, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    ids = torch.randint(0, 16384, (2, 65), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


MODELS: Dict[str, ModelSpec] = {
    "resnet": ModelSpec("resnet", ResNet, _images, nn.functional.cross_entropy, 4),
    "gpt2": ModelSpec("gpt2", GPT, _text, _next_token_loss, 2),
}


def parameter_count(name: str) -> int:
    """Trainable parameters of model ``name`` (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"Expected argument `model` to be one of {sorted(MODELS)}, but got {name!r}.")
    return sum(p.numel() for p in MODELS[name].build().parameters() if p.requires_grad)
