"""Engine hardening (issues 13 and 15): each case against an independent float64 reference
(a loop of single-example backward passes) or a clear error, never wrong numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vr_mcmc.per_example import PerExampleError, PerExampleGradients

F64 = torch.float64


def _loop(model: nn.Module, example_loss, b: int) -> dict[str, torch.Tensor]:
    """Reference: the gradient of example_loss(i) for each i, stacked (sparse gradients densified)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = []
    for i in range(b):
        grads = torch.autograd.grad(example_loss(i), list(params.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
                     for g, p in zip(grads, params.values())])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(params)}


def _assert_matches(grads, ref, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert set(grads) == set(ref)
    for n in ref:
        torch.testing.assert_close(grads[n].dense(), ref[n], rtol=rtol, atol=atol, msg=n)


# -- 13.1: Embedding(sparse=True) ----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_sparse_embedding_is_checked_and_exact(reduction, padding_idx):
    torch.manual_seed(0)
    emb = nn.Embedding(11, 4, sparse=True, padding_idx=padding_idx).double()
    head = nn.Linear(4, 1).double()
    model = nn.Sequential(emb, nn.Tanh(), head)
    idx = torch.randint(0, 11, (6, 5))
    idx[0, :2] = 2  # a padding lookup and a repeated row

    def loss_of(out):
        return out.square().sum()

    with PerExampleGradients(model, reduction) as engine:
        out = model(idx)
        (loss_of(out) / (6 if reduction == "mean" else 1)).backward()
        assert emb.weight.grad.is_sparse
        grads = engine.collect()
    ref = _loop(model, lambda i: loss_of(model(idx[i : i + 1])), 6)
    _assert_matches(grads, ref)
    assert engine.check_ratios["0.weight"] < 1


def test_sparse_embedding_gradient_that_bypasses_the_hooks_is_refused():
    emb = nn.Embedding(11, 4, sparse=True).double()
    idx = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(0))
    with PerExampleGradients(emb, "sum") as engine:
        # The weight also used outside the module's forward: part of its (sparse) gradient is missed.
        (emb(idx).square().sum() + nn.functional.embedding(idx[:1], emb.weight, sparse=True).sum()).backward()
        with pytest.raises(PerExampleError, match="do not add up"):
            engine.collect()
