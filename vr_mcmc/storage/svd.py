"""Batched truncated SVD: exact for small matrices, randomized (Halko, Martinsson & Tropp 2011) otherwise."""

from __future__ import annotations

import torch

__all__ = ["randomized_svd"]

# Up to this size of the smaller side, the eigendecomposition of the small Gram matrix is faster than
# sketching (measured on CPU for the CIFAR CNN's conv gradients: 1.1-2.6x) and exact.
_GRAM_MAX = 128


def _gram_svd(matrices: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD through the eigenvectors of the smaller Gram matrix (M Mᵀ or MᵀM).

    The rank-r matrix returned is the projection of M on its top-r singular subspace, the
    Eckart–Young optimum; singular values are recomputed from the projection rather than taken as
    square roots of eigenvalues, so they keep the matrices' precision.
    """
    wide = matrices.shape[1] <= matrices.shape[2]
    m = matrices if wide else matrices.transpose(1, 2)
    # The Gram matrix squares the condition number: form and decompose it in float64.
    m64 = m.double()
    _, vectors = torch.linalg.eigh(m64 @ m64.transpose(1, 2))
    u = vectors[..., -r:].flip(-1).to(matrices.dtype)  # [B, small, r], largest first
    projected = u.transpose(1, 2) @ m  # [B, r, large] = S Vᵀ
    s = torch.linalg.vector_norm(projected, dim=2).clamp_min(torch.finfo(matrices.dtype).tiny)
    vh = projected / s.unsqueeze(-1)
    if wide:
        return u, s, vh
    return vh.transpose(1, 2), s, u.transpose(1, 2)

def randomized_svd(
    matrices: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD of each matrix of ``matrices [B, m, n]``: (U [B, m, r], S [B, r], Vh [B, r, n]).

    When ``rank + oversample`` reaches min(m, n) the exact SVD is as cheap and is used. Otherwise a
    Gaussian sketch with ``oversample`` extra columns and ``power_iterations`` rounds of subspace
    iteration (re-orthonormalized each round) captures the top singular subspace; its error is
    within a few percent of the Eckart–Young optimum for gradient-like spectra.
    """
    b, m, n = matrices.shape
    r = min(rank, m, n)
    k = r + oversample
    if k >= min(m, n):
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return u[..., :r], s[..., :r], vh[..., :r, :]
    if min(m, n) <= _GRAM_MAX:
        return _gram_svd(matrices, r)
    omega = torch.randn(b, n, k, generator=generator, device=matrices.device, dtype=torch.float32).to(matrices.dtype)
    q, _ = torch.linalg.qr(matrices @ omega)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(matrices.transpose(1, 2) @ q)
        q, _ = torch.linalg.qr(matrices @ z)
    small = q.transpose(1, 2) @ matrices  # [B, k, n]
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ u_small)[..., :r], s[..., :r], vh[..., :r, :]
