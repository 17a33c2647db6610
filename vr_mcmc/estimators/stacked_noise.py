"""The ``noise_var`` diagnostic of `vr_mcmc.estimators.noise` for C chains at once, from their per-example gradients
stacked with a leading chain dimension (vectorized chains, `vr_mcmc.chains.batched.StackedPerExample`).

Per chain c and parameter p, with d_cj the batch's rows of the estimator's noise (g_cj for the minibatch estimate,
g_cj − h_cj for SAGA's) and b the batch size, the variance (trace) of (R/b)·Σ_{j∈S} d_cj is

    R²/b · (1 − b/R) · s²_c,    s²_c = (Σ_j ‖d_cj‖² − ‖Σ_j d_cj‖²/b) / (b − 1),

as `noise.sampling_variance` computes it for one chain (NaN for a batch of one row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["factored_sq_norms", "stacked_sampling_variance"]


def factored_sq_norms(inputs: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """[C, B]: ‖Σ_t dZ_tᵀ A_t‖² per example for factors [C, B, G, T, d] (summed over the groups G), by
    Σ_{t,s} (dz_t·dz_s)(a_t·a_s) (`Factored.sq_norms`' formula, for the few positions of a Linear layer)."""
    if inputs.shape[-2] == 1:
        return (grad_outputs.square().sum(-1) * inputs.square().sum(-1)).sum((2, 3))
    gram_z = torch.matmul(grad_outputs, grad_outputs.transpose(-1, -2))
    gram_a = torch.matmul(inputs, inputs.transpose(-1, -2))
    return (gram_z * gram_a).sum((2, 3, 4))


def stacked_sampling_variance(squares: Sequence[torch.Tensor], sums: Sequence[torch.Tensor], batch_size: int,
                              num_rows: int) -> torch.Tensor:
    """[C, P] float64: per chain and parameter, the estimated variance (trace) of (R/b)·Σ_{j∈S} d_j, from
    ``squares[p]`` [C] = Σ_j ‖d_cj‖² and ``sums[p]`` [C, ...] = Σ_j d_cj."""
    sq = torch.stack([s.to(torch.float64) for s in squares], 1)
    c = sq.shape[0]
    if batch_size < 2:
        return torch.full_like(sq, float("nan"))
    tot = torch.stack([s.to(torch.float64).reshape(c, -1).square().sum(1) for s in sums], 1)
    b = float(batch_size)
    s2 = (sq - tot / b) / (b - 1)
    return s2.clamp_min(0.0) * (num_rows**2 / b) * (1.0 - b / num_rows)


def minibatch_variance(reps: object, names: Sequence[str], grads: dict[str, torch.Tensor], batch_size: int,
                       num_data: int) -> torch.Tensor:
    """[C, P] float64: the minibatch estimate's ``noise_var`` (d_j = g_j) for parameters ``names``, from the stacked
    per-example gradients ``reps`` and the batch-mean gradients ``grads`` (Σ_j g_j = B·∇ of the batch mean)."""
    squares = []
    for n in names:
        entry = reps.entries[n]
        if entry[0] == "factored":
            squares.append(factored_sq_norms(entry[1], entry[2]).sum(1))
        else:
            squares.append(entry[1].reshape(entry[1].shape[0], -1).square().sum(1))
    return stacked_sampling_variance(squares, [grads[n] * batch_size for n in names], batch_size, num_data)
