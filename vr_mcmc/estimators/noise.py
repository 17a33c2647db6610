"""The variance of an estimator's noise, estimated from the per-example gradients of the batch.

Every estimator of Σ_{j=1..R} ∇ℓ_j that the samplers use has the form c + (R/b)·Σ_{j∈S} d_j, with S
b rows drawn uniformly without replacement from R (examples, or partition blocks) and c fixed given
the past: d_j = g_j for the minibatch estimate, g_j − h_j for SAGA (h_j the stored row),
g_j(θ) − g_j(θ̃) for SVRG and the control variate. Its variance (trace, per parameter) is

    Var = R²/b · (1 − b/R) · s²,    s² = (Σ_{j∈S} ‖d_j‖² − ‖Σ_{j∈S} d_j‖²/b) / (b − 1),

with s² the batch's unbiased estimate of the rows' variance (the finite-population correction
1 − b/R makes it exact for sampling without replacement). Samplers turn it into ``noise_ratio``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..per_example import PerExampleGradient

__all__ = ["sampling_variance", "variance_from_sums"]


def variance_from_sums(squares: torch.Tensor, totals: torch.Tensor, b: torch.Tensor | int, num_rows: int
                       ) -> torch.Tensor:
    """R²/b·(1 − b/R)·s² from ``squares`` = Σ_{j∈S} ‖d_j‖² and ``totals`` = ‖Σ_{j∈S} d_j‖² (float64, per
    parameter) over b ≥ 2 rows."""
    s2 = (squares - totals / b) / (b - 1)
    return s2.clamp_min(0.0) * (num_rows**2 / b) * (1.0 - b / num_rows)


def sampling_variance(
    diffs: Sequence[PerExampleGradient | None], sums: Sequence[torch.Tensor | None], num_rows: int
) -> torch.Tensor:
    """Per parameter, the estimated variance (trace) of (R/b)·Σ_{j∈S} d_j, float64 ``[len(diffs)]``.

    ``diffs[p]``: the b rows d_j of parameter p (a representation), or None where there is none (NaN);
    ``sums[p]``: Σ_j d_j if the caller has it (else computed). NaN for a batch of one row.
    """
    out = torch.full((len(diffs),), float("nan"), dtype=torch.float64)
    squares, totals, where, sizes = [], [], [], []
    for k, (rep, total) in enumerate(zip(diffs, sums)):
        if rep is None:
            continue
        b = rep.batch_size
        if b < 2:
            continue
        total = rep.sum() if total is None else total
        squares.append(rep.sq_norms().to(torch.float64).sum())
        totals.append(total.to(torch.float64).square().sum())
        where.append(k)
        sizes.append(b)
    if where:
        # The same float64 arithmetic as one parameter at a time, on all of them at once.
        sq, tot = torch.stack(squares), torch.stack(totals)
        b = torch.tensor(sizes, dtype=torch.float64, device=sq.device)
        out[where] = variance_from_sums(sq, tot, b, num_rows).cpu()
    return out
