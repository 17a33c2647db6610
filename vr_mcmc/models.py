"""Reference architectures used by the benchmarks, the demo and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

__all__ = ["TransformerClassifier", "cnn", "mlp"]


def mlp(sizes: Sequence[int] = (784, 512, 512, 10), activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A fully connected network with the given layer widths, e.g. 784-512-512-10."""
    if len(sizes) < 2:
        raise ValueError("mlp needs at least an input and an output width")
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def cnn(
    input_shape: Sequence[int] = (3, 32, 32),
    channels: Sequence[int] = (32, 32, 64, 64),
    num_classes: int = 10,
) -> nn.Sequential:
    """A CIFAR-shaped CNN: 3×3 convolutions in pairs, each pair followed by 2×2 max pooling, then Linear."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for i, c_out in enumerate(channels):
        layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.ReLU()]
        c = c_out
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    return nn.Sequential(*layers)


class TransformerClassifier(nn.Module):
    """A small pre-norm transformer block over token sequences [B, T] with a linear classifier head."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, num_classes: int = 4, padding_idx: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        z = self.norm1(h)
        h = h + self.attn(z, z, z, need_weights=False)[0]
        h = h + self.ff(self.norm2(h))
        return self.head(h.mean(1))
