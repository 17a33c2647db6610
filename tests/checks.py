"""The exactness check every per-example test uses: the engine against a float64 loop of backward passes.

Bars (issue #2): float64 relative error ≤ 1e-10; float32 atol 1e-5 / rtol 1e-4 for Linear-type
layers and atol 1e-4 / rtol 1e-3 for convolutions, against the float64 loop run on the same
(float32-valued) weights and inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vr_mcmc.per_example import Factored, PerExampleGradients
from vr_mcmc.per_example.reference import loop_per_example_grads

FLOAT32_TOL = {"linear": (1e-5, 1e-4), "conv": (1e-4, 1e-3)}
FLOAT64_REL = 1e-10


def tanh_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_i = ‖tanh(out_i) − target_i‖²: nonlinear in the output, so dZ differs per example."""
    return (out.tanh() - target).square().reshape(out.shape[0], -1).sum(1)


def cross_entropy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, target, reduction="none")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, what: str, count: int = 1) -> None:
    """``count`` > 1 for a sum of that many per-example terms: absolute rounding grows with it."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if kind == "float64":
        err = float((actual - expected).norm())
        scale = max(float(expected.norm()), 1e-30)
        assert err <= FLOAT64_REL * scale, f"{what}: relative error {err / scale:.2e} > {FLOAT64_REL}"
    else:
        atol, rtol = FLOAT32_TOL[kind]
        torch.testing.assert_close(actual, expected, atol=atol * count, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_engine(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str,
    loss=tanh_loss,
    kind: str = "linear",
    seed: int = 0,
) -> dict:
    """Run the engine on one batch and compare every operation of every representation with the loop."""
    dtype = next(model.parameters()).dtype
    kind = "float64" if dtype == torch.float64 else kind
    b = x.shape[0]
    model.zero_grad(set_to_none=True)
    with PerExampleGradients(model, loss_reduction=reduction) as engine:
        losses = loss(model(x), target)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
        grads = engine.collect()
    dot_grad = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref_model = copy.deepcopy(model).double()
    as64 = (lambda t: t.double()) if x.is_floating_point() else (lambda t: t)
    t64 = target.double() if target.is_floating_point() else target
    ref = loop_per_example_grads(ref_model, lambda o, t: loss(o, t).sum(), as64(x), t64)

    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(b, generator=gen, dtype=torch.float64)
    subset = torch.randperm(b, generator=gen)[: max(1, b // 2)]
    scale = b if reduction == "mean" else 1
    assert set(grads) == set(ref), f"parameters {set(grads) ^ set(ref)} missing"
    for name, rep in grads.items():
        r = ref[name]
        assert rep.batch_size == b and rep.shape == r.shape[1:]
        assert_close(rep.dense(), r, kind, f"{name} dense")
        g = dot_grad[name] if dot_grad[name] is not None else torch.zeros_like(r[0])
        assert_close(rep.sum(), g * scale, kind, f"{name} Σ_i g_i vs .grad", count=b)
        assert_close(rep.sum(), r.sum(0), kind, f"{name} sum", count=b)
        assert_close(rep.sum(weights.to(dtype)), torch.tensordot(weights, r, dims=1), kind, f"{name} weighted sum", b)
        sq = r.flatten(1).square().sum(1)
        assert_close(rep.sq_norms(), sq, kind, f"{name} sq_norms", count=max(1, int(sq.max().ceil())))
        assert_close(rep.index(subset).dense(), r[subset], kind, f"{name} index")
        if isinstance(rep, Factored):  # chosen only when it is the smaller exact representation
            assert rep.nbytes <= b * r[0].numel() * rep.grad_outputs.element_size()
    return grads
