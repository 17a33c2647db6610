"""Reference architectures used by the benchmarks, the demo and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "PartlyOutside", "TransformerClassifier", "cnn", "lenet5", "mlp", "rad_cnn", "resnet34",
           "vgg16"]


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


def rad_cnn() -> nn.Sequential:
    """The randomized-autodiff memory benchmark's CNN for 3×32×32 inputs: three 5×5 convolutions
    (16, 32, 32 channels, padding 2), each with ReLU and 2×2 pooling (max, max, average), then
    Linear 512→10. Smaller than Oktay et al.'s own CNN; used by `benchmarks/rad_memory.py` and the tests."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(512, 10),
    )


class PartlyOutside(nn.Module):
    """A 784-512-10 net whose ``fc.weight`` is also used by ``F.linear`` in the parent's forward, with
    a factor s: a share s/(1+s) of its gradient bypasses the per-example engine's hooks (the case
    the engine's consistency check must refuse; used by `benchmarks/check_detection.py` and the tests)."""

    def __init__(self, factor: float):
        super().__init__()
        self.fc = nn.Linear(784, 512)
        self.head = nn.Linear(512, 10)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x) + self.factor * nn.functional.linear(x, self.fc.weight)))


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


def lenet5(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 (LeCun et al. 1998) for 32×32 inputs: conv 6@5×5, pool, conv 16@5×5, pool, 120-84-classes."""
    c, h, w = input_shape
    h, w = (h - 4) // 2, (w - 4) // 2
    h, w = (h - 4) // 2, (w - 4) // 2
    return nn.Sequential(
        nn.Conv2d(c, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * h * w, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> nn.Sequential:
    """VGG16 (Simonyan & Zisserman 2015), CIFAR variant: 13 3×3 convs with BatchNorm, 512-classes head."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet34(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> nn.Sequential:
    """ResNet34 (He et al. 2016), CIFAR variant: 3×3 stem, stages of 3-4-6-3 basic blocks, 512-classes head."""
    c = input_shape[0]
    layers: list[nn.Module] = [nn.Conv2d(c, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    c_in = 64
    for c_out, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(_BasicBlock(c_in, c_out, stride if b == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


# name -> (builder(input_shape, num_classes), default input shape)
ARCHITECTURES = {
    "lenet5": (lambda shape, k: lenet5(shape, k), (3, 32, 32)),
    "vgg16": (lambda shape, k: vgg16(shape, k), (3, 32, 32)),
    "resnet34": (lambda shape, k: resnet34(shape, k), (3, 32, 32)),
    "mlp": (lambda shape, k: mlp((int(torch.tensor(shape).prod()), 512, 512, k)), (784,)),
}
