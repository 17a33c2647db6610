"""Per-example gradients from one forward/backward pass (DESIGN.md §3).

`PerExampleGradients` hooks a model; after an ordinary ``loss.backward()`` its ``collect()``
returns, for every trainable parameter, a compact representation of the B per-example
gradients (`Factored`, `Dense`, `LowRank`, `RowSparse`). Rules per layer type are registered
with `register_rule`; other layers fall back to torch.func. BatchNorm on batch statistics mixes
examples: `replace_batchnorm` (GroupNorm) or `freeze_batchnorm` (fixed running statistics).
"""

from .batchnorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, freeze_batchnorm, replace_batchnorm
from .engine import PerExampleGradients, sq_norms
from .errors import MixedExamplesError, PerExampleError, SlowFallbackWarning, UnsupportedLayerError
from .registry import find_rule, register_rule
from .representations import Dense, Factored, LowRank, PerExampleGradient, RowSparse, combine

__all__ = [
    "Dense",
    "Factored",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "LowRank",
    "MixedExamplesError",
    "PerExampleError",
    "PerExampleGradient",
    "PerExampleGradients",
    "RowSparse",
    "SlowFallbackWarning",
    "UnsupportedLayerError",
    "combine",
    "find_rule",
    "freeze_batchnorm",
    "register_rule",
    "replace_batchnorm",
    "sq_norms",
]
