"""Evaluations of U and ∇U from a closure, and the cache of the current state's, for the closure-driven samplers.

U(θ) = N·loss(θ) + (−log p(θ)) where ``closure()`` computes the loss (the mean NLL over the whole
data set; with ``num_data=1``, U itself), calls ``backward`` and returns it. An evaluation never
raises for a point outside the density: a non-finite U or ∇U, or a domain error from the closure,
is an evaluation marked not finite (the samplers reject it as ``diverging``). The cache keeps U and
∇U of the current θ, keyed by the parameters' version counters, so a step needs one new
evaluation and an outside change of the parameters is noticed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DOMAIN_ERRORS", "EvaluationCache", "Point"]


# Exceptions from the closure that mean "θ is outside the density's domain" (torch.distributions'
# support checks raise ValueError, a Cholesky of a matrix that is not positive definite LinAlgError):
# at a proposal they are a divergence, like a NaN; at the chain's start they propagate. Any other
# exception propagates after the parameters, their .grad and the cached U are restored.
DOMAIN_ERRORS = (ValueError, ArithmeticError, torch.linalg.LinAlgError)


class Point:
    """U, ∇U and the parameters' version counters at one θ (``error``: the closure's domain error)."""

    def __init__(self, potential: float, grads: list[torch.Tensor], finite: bool, versions: list[int],
                 error: BaseException | None = None):
        self.potential, self.grads, self.finite, self.versions = potential, grads, finite, versions
        self.error = error


class EvaluationCache:
    """Evaluates U, ∇U for an optimizer's param groups (each group's ``prior``) and ``num_data``, and
    holds the current state's (`current`, set by `commit`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, num_data: int):
        self.optimizer = optimizer
        self.num_data = num_data
        self.point: Point | None = None

    def evaluate(self, closure: Callable[[], Any], params: list[torch.Tensor]) -> Point:
        """U, ∇U at the parameters' current values."""
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                loss = closure()
        except DOMAIN_ERRORS as error:  # outside the density's domain: a divergence, as Stan rejects on domain_error
            return Point(math.inf, [torch.zeros_like(p) for p in params], False, [p._version for p in params], error)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                f"the closure must return the loss as a one-element tensor (after loss.backward()), got "
                f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}"
            )
        if all(p.grad is None for p in params):
            raise RuntimeError("the closure returned without gradients: it must call loss.backward() before returning "
                               "the loss (as for torch.optim.LBFGS)")
        num_data = self.num_data
        potential = num_data * loss.item()
        groups = self.optimizer.param_groups
        if len(groups) == 1 and groups[0]["prior"] is None and len(groups[0]["params"]) == len(params):
            # The common case, without the per-group work. With num_data = 1 the gradients are the closure's own
            # tensors, not copies: p.grad was None before the closure, so backward made new ones.
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() if num_data == 1
                     else p.grad.detach() * num_data for p in params]
        else:
            grads = []
            with torch.no_grad():
                for group in groups:
                    prior = group["prior"]
                    for p in group["params"]:
                        if not p.requires_grad:
                            continue
                        g = torch.zeros_like(p) if p.grad is None else p.grad.detach() * num_data
                        if prior is not None:
                            prior.add_grad_(p, g)
                            potential -= float(prior.log_prob(p))
                        grads.append(g)
        # A finite sum means finite entries (one reduction); a non-finite sum may be an overflow, so check then.
        finite = math.isfinite(potential) and all(math.isfinite(g.sum().item()) or bool(g.isfinite().all())
                                                  for g in grads)
        return Point(potential, grads, finite, [p._version for p in params])

    def current(self, closure: Callable[[], Any], params: list[torch.Tensor]) -> Point:
        """The current state's evaluation: cached, or evaluated (and required finite) when the parameters
        changed since the last `commit` (or there was none)."""
        cur = self.point
        if cur is None or cur.versions != [p._version for p in params]:
            for p in params:
                if not bool(torch.isfinite(p).all()):
                    raise ValueError("the parameters hold NaN or inf: start the chain from finite values")
            cur = self.evaluate(closure, params)
            if cur.error is not None:
                raise cur.error
            if not cur.finite:
                raise ValueError(
                    f"the log density at the current parameters is not finite (U = {cur.potential}): start the chain "
                    "where the closure's loss and its gradient are finite"
                )
            self.point = cur
        return cur

    def commit(self, point: Point, params: list[torch.Tensor]) -> None:
        """Make ``point`` the current state: its gradient in ``.grad``, the parameters' versions recorded."""
        for p, g in zip(params, point.grads):
            p.grad = g.clone()
        point.versions = [p._version for p in params]
        self.point = point

    def clear(self) -> None:
        self.point = None
