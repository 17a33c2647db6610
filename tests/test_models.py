"""Whole networks against the float64 loop: an MLP, a CNN with pooling, a transformer-style block."""

from __future__ import annotations

import pytest
import torch
from checks import check_engine, cross_entropy
from torch import nn

from vr_mcmc.models import TransformerClassifier, cnn, mlp
from vr_mcmc.per_example import Factored, RowSparse


def _models():
    return {
        # name: (model, input maker, tolerance kind for float32)
        "mlp": (lambda: mlp((20, 16, 16, 5), activation=lambda: nn.ReLU(inplace=True)),
                lambda b, g: torch.randn(b, 20, generator=g), "linear"),
        "cnn": (lambda: cnn((3, 12, 12), channels=(4, 6, 6, 8), num_classes=5),
                lambda b, g: torch.randn(b, 3, 12, 12, generator=g), "conv"),
        "transformer": (lambda: TransformerClassifier(vocab=30, dim=8, heads=2, num_classes=5),
                        lambda b, g: torch.randint(0, 30, (b, 7), generator=g), "linear"),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch", [1, 6, 17])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_whole_model(name, batch, reduction, dtype):
    make, make_input, kind = _models()[name]
    torch.manual_seed(batch)
    gen = torch.Generator().manual_seed(batch)
    model = make().to(dtype)
    x = make_input(batch, gen)
    x = x.to(dtype) if x.is_floating_point() else x
    y = torch.randint(0, 5, (batch,), generator=gen)
    grads = check_engine(model, x, y, reduction=reduction, loss=cross_entropy, kind=kind)
    if name == "mlp":
        assert isinstance(grads["0.weight"], Factored)
    if name == "transformer":
        assert isinstance(grads["embed.weight"], RowSparse)
        assert grads["embed.weight"].dense()[:, 0].abs().max() == 0  # padding_idx 0 gets no gradient
