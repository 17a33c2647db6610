"""The engine's consistency check: per-example gradients must add up to the backward pass's gradient.

For every parameter, ``Σ_i g_i`` (the per-example gradients the rules and the fallback returned)
must equal the gradient that reached the parameter in the ordinary backward pass (×B for a mean
loss). `ConsistencyCheck` tests this through a few fixed random rank-1 probes, at the cost of
what the representations hold. Sums of per-position terms (`Dense.from_terms`: biases, norm
parameters) keep their terms until the check has run, since the size of what was summed, not of
the sum, sets the scale of rounding error; `release_terms` then drops them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import PerExampleError
from .representations import Dense, PerExampleGradient

__all__ = ["PROBES", "SPOT_CHECK_EVERY", "SPOT_CHECK_FIRST", "ConsistencyCheck", "release_terms"]

SPOT_CHECK_FIRST = 8  # batches checked in full at the start (the samplers' steps, the fallback's replays)
SPOT_CHECK_EVERY = 64  # then one in this many

PROBES = 4  # independent probes: a missing gradient part escapes all of them with negligible chance


def release_terms(grads: Mapping[str, PerExampleGradient]) -> None:
    """Forget the per-position terms of `Dense` results (views of activations, needed only by the check)."""
    for rep in grads.values():
        if isinstance(rep, Dense):
            rep.terms = None


class ConsistencyCheck:
    """Checks ``Σ_i g_i`` against each parameter's gradient by fixed random probes (drawn once per parameter)."""

    def __init__(self, seed: int = 0x5EED):
        self._generator = torch.Generator().manual_seed(seed)  # never touches the global RNG
        self._probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Per parameter, the last check's gap in units of its tolerance (> 1 fails).
        self.ratios: dict[str, float] = {}

    def probe_vectors(self, name: str, param: nn.Parameter, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed random probes (u [rows, k], w [cols, k]) for a parameter, drawn once."""
        rows = param.shape[0] if param.dim() > 0 else 1
        cached = self._probes.get(name)
        if cached is None or cached[0].dtype != dtype or cached[0].device != param.device:
            # Stored [k, n] and handed out transposed: BLAS is several times faster with skinny
            # right-hand sides in this layout.
            u, w = (
                torch.randn(PROBES, n, generator=self._generator, dtype=torch.float64)
                .to(param.device, dtype)
                .t()
                for n in (rows, param.numel() // rows)
            )
            cached = self._probes[name] = (u, w)
        return cached

    def run(
        self,
        grads: Mapping[str, PerExampleGradient],
        params: Mapping[str, nn.Parameter],
        param_grads: Mapping[str, torch.Tensor],
        low_eps: Mapping[str, float],
        loss_reduction: str,
    ) -> None:
        """Σ_i g_i must equal each parameter's gradient G from this backward (×B for a mean).

        Checked through random rank-1 probes uᵀ(·)w with standard normal u, w, which cost what the
        representations hold. A missing part D of the gradient moves a probe by about ‖D‖_F. With S
        the root-sum-square of the probe's n terms plus ‖G‖_F, accumulating in the parameters'
        precision moves it by about eps·√n·S, and operands rounded to a lower precision (autocast,
        eps_low) by about eps_low·S; the tolerance is (1000·eps·√n + 5·eps_low)·S (legitimate
        bfloat16 runs of an MLP, a CNN and a transformer peaked at 1/12 of it). This catches every
        way a parameter can get gradient the hooks did not see: a parameter used outside the
        forward of its module, a child of a torch.func layer also called directly, an extra
        autograd pass through the graph, a non-per-example term in the loss.

        ``param_grads``: each parameter's gradient from the backward pass (dense or sparse COO);
        ``low_eps``: per parameter, the machine epsilon of the lowest precision its operands had.
        Sets `ratios` (gap / tolerance per parameter) and raises `PerExampleError` if one exceeds 1.
        """
        names, gaps, scales, coefficients = [], [], [], []
        for name, rep in grads.items():
            param = params[name]
            if rep.batch_size == 0 or param.numel() == 0:
                continue
            u, w = self.probe_vectors(name, param, rep.dtype)
            value, rss, count = rep.probe(u, w)
            grad = param_grads.get(name)
            factor = rep.batch_size if loss_reduction == "mean" else 1
            if grad is not None and grad.is_sparse and grad.sparse_dim() == 1:
                # Embedding(sparse=True): rows of a sparse COO gradient, probed without densifying.
                grad = grad.coalesce()
                rows, vals = grad.indices()[0], grad.values().reshape(-1, w.shape[0]).to(rep.dtype)
                value = value - ((vals @ w) * u[rows]).sum(0) * factor
                rss = rss + torch.linalg.vector_norm(vals) * factor
            elif grad is not None:
                g = (grad.to_dense() if grad.is_sparse else grad).reshape(u.shape[0], w.shape[0]).to(rep.dtype)
                value = value - ((g @ w) * u).sum(0) * factor
                rss = rss + torch.linalg.vector_norm(g) * factor
            names.append(name)
            gaps.append(value.abs().to("cpu", torch.float64))
            scales.append(rss.to("cpu", torch.float64))
            eps = torch.finfo(rep.dtype).eps
            coefficients.append(1000 * eps * count**0.5 + 5 * (low_eps[name] if low_eps[name] > eps else 0.0))
        if not names:
            return
        # One host transfer for all parameters; float64 so that a zero gradient (0/0) counts as agreement.
        gap, scale = torch.stack(gaps).amax(1), torch.stack(scales).amax(1)
        ratio = gap / (scale * torch.tensor(coefficients) + 1e-300)
        # Non-finite gradients (an overflowing mixed-precision step) cannot be checked; the caller
        # sees them in the gradients themselves.
        self.ratios = dict(zip(names, ratio.tolist()))
        bad = (ratio > 1) & gap.isfinite() & scale.isfinite()
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise PerExampleError(
                f"the per-example gradients of '{names[i]}' do not add up to its gradient from the backward pass "
                f"(off by {float(ratio[i]):.3g} times the rounding tolerance), so part of its gradient did not "
                "come from per-example losses through the engine's hooks. Common causes: a term of the loss "
                "that is not a sum of per-example losses (a prior or weight decay added to the loss: give it to "
                "the sampler as prior= instead); the parameter used outside the forward of the module that "
                "owns it (e.g. h @ self.embed.weight.T in a parent's forward: tie it to an nn.Linear instead, "
                "or register a rule for the parent); a child of a layer without a rule also called directly; "
                "an extra autograd pass (torch.autograd.grad) through the graph before backward; activation "
                "checkpointing (not supported). PerExampleGradients(..., check=False) skips this check."
            )
