"""Randomized automatic differentiation (Oktay et al., ICLR 2021): unbiased weight gradients from sampled activations.

A Linear or Conv layer Z = W·A (+ b) needs its input A in the backward pass only for the weight
gradient dL/dW = dZᵀ A. A randomized layer computes the forward exactly but saves only a random
share of A (a ``keep`` fraction of its positions, or a random projection) and uses the unbiased
estimate Â = R(A), E[R] = I, in its place: dL/dW ≈ dZᵀ Â. The input gradient dZ·W and the bias
gradient use no activation and stay exact, so every dZ below the layer is exact too and the only
randomness is in the weight gradients. The pattern is regenerated in backward from an integer
seed. Modes (see `vr_mcmc.rad.sampling` for the estimators and their variances):

- ``"same"``: one random set of k = ⌈keep·D⌉ positions for the whole batch, scaled D/k;
- ``"different"``: one set per example;
- ``"projection"``: Â = A P Pᵀ with P [D, k] of ±1/√k, one P per batch.

D is ``in_features`` for Linear and the number of spatial positions for Conv (all channels of a
kept position are kept). E‖Â − A‖² per example is (D − k)/k·‖A‖² (sampling without replacement,
the default), (D − 1)/k·‖A‖² (``replacement=True``, and projection).

Usage::

    model = vr_mcmc.rad.randomize(model, keep=0.1, mode="different")   # in place; same parameters
    vr_mcmc.rad.saved_activation_bytes(model, x)                        # what autograd keeps

`randomize` also swaps ``nn.ReLU`` and pooling modules for exact versions that save less
(`LeanReLU` keeps ReLU's Jacobian as one bit per entry): once activations are sampled, a float
copy of every ReLU output would otherwise dominate the memory. Functional ``F.relu`` calls are
not replaced.

**With SG-MCMC.** SGLD on a randomized model uses ĝ(θ) = N·∇̂(batch mean NLL) with
E[ĝ | batch] = the minibatch estimate, so E[ĝ] = ∇U_data(θ): it is SGLD with extra zero-mean
gradient noise, a valid SG-MCMC (its bias at step h grows with the noise's variance as for
smaller batches, and vanishes as h → 0).

**With SVRG-LD / SGLD-CV.** The estimate is v = μ̃ + (N/B)·Σ_{i∈S}(g_i(θ) − g_i(θ̃)). For each
layer write ĝ(θ; R) = dZ(θ)ᵀ R[A(θ)] for the randomized weight gradient of the batch at θ with
random operator R (the pattern). `vr_mcmc.estimators.ControlVariate` (and so SVRG) computes μ̃
inside `exact()` (exact full gradient) and runs the closure at θ̃ inside `repeat_last_pattern()`,
so both batch gradients use the same R:

    v̂ = μ̃ + (N/B)·(ĝ(θ; R) − ĝ(θ̃; R)).

Unbiased: ĝ(·; R) is linear in R and E[R] = I, so E_R[v̂] = μ̃ + (N/B)·(g(θ) − g(θ̃)) = v, the
exact minibatch SVRG estimate (whose expectation over batches is ∇U_data(θ)).
Vanishing error: v̂ − v = (N/B)·(e(θ; R) − e(θ̃; R)) with e(θ; R) = dZ(θ)ᵀ (R − I)[A(θ)]. For a
fixed R, e is a smooth function of θ (dZ and A are), so ‖e(θ; R) − e(θ̃; R)‖ ≤ L_R·‖θ − θ̃‖ and
the extra variance is O(‖θ − θ̃‖²): as θ → θ̃ the randomized SVRG estimate becomes the exact one,
just as SVRG's minibatch noise vanishes there. With independent patterns at θ and θ̃ instead,
the error's variance would be Var e(θ) + Var e(θ̃), which does not vanish. The repeat needs the
same calls of each layer at θ̃ as at θ (the closure is the same function); a layer remembers
the seeds of its calls since its last backward pass.

**Per-example gradients.** `vr_mcmc.per_example.PerExampleGradients` refuses randomized forwards
(their per-example gradients would not add up to ``.grad``, and the engine keeps the full
activations anyway, undoing the saving): SAGA-LD needs the exact model, or forwards inside
`exact()`.
"""

from .context import exact, repeat_last_pattern
from .convert import derandomize, randomize, saved_activation_bytes, saved_tensors
from .layers import (
    RandConv1d,
    RandConv2d,
    RandConv3d,
    RandLinear,
    RandomizedLayer,
)
from .lean import (
    LeanAvgPool1d,
    LeanAvgPool2d,
    LeanAvgPool3d,
    LeanMaxPool1d,
    LeanMaxPool2d,
    LeanMaxPool3d,
    LeanReLU,
)
from .sampling import MODES, num_kept, variance_factor

__all__ = [
    "MODES",
    "LeanAvgPool1d",
    "LeanAvgPool2d",
    "LeanAvgPool3d",
    "LeanMaxPool1d",
    "LeanMaxPool2d",
    "LeanMaxPool3d",
    "LeanReLU",
    "RandConv1d",
    "RandConv2d",
    "RandConv3d",
    "RandLinear",
    "RandomizedLayer",
    "derandomize",
    "exact",
    "num_kept",
    "randomize",
    "repeat_last_pattern",
    "saved_activation_bytes",
    "saved_tensors",
    "variance_factor",
]
