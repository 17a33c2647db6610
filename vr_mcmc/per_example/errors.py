"""Errors raised by the per-example gradient engine."""

from __future__ import annotations

__all__ = ["MixedExamplesError", "PerExampleError", "SlowFallbackWarning", "UnsupportedLayerError"]


class PerExampleError(RuntimeError):
    """Per-example gradients cannot be computed as asked."""


class MixedExamplesError(PerExampleError):
    """A layer mixes the examples of a batch, so per-example gradients are undefined."""


class UnsupportedLayerError(PerExampleError):
    """A layer has no per-example rule and the torch.func fallback cannot handle it."""


class SlowFallbackWarning(UserWarning):
    """The torch.func fallback could not vectorize a layer and loops over the examples in Python."""
