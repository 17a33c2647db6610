"""The slow, obviously correct reference: one backward pass per example."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["loop_per_example_grads"]


def loop_per_example_grads(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """``g_i = ∇_θ loss_fn(model(x_i), y_i)`` for each example, stacked: ``{name: [B, *shape]}``.

    ``loss_fn`` must give example i's own loss ℓ_i for a batch of one (e.g. reduction="sum").
    Use it to check a custom rule; it leaves ``.grad`` as it found it.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}
