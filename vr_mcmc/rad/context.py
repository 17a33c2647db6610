"""How randomized layers behave in the current thread: random patterns (the default), exact, or repeated.

These contexts import nothing from the rest of the package, so estimators can enter them without
import cycles; with no randomized layer in a model they change nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator

__all__ = ["EXACT", "RANDOM", "REPEAT", "current_mode", "exact", "repeat_epoch", "repeat_last_pattern"]

RANDOM = "random"  # a fresh pattern for every call, recorded for a later repeat
EXACT = "exact"  # the exact layer: full activation saved, exact weight gradient
REPEAT = "repeat"  # each layer reuses, call by call, the patterns of its last randomized forward pass

_local = threading.local()
_epochs = itertools.count(1)


def current_mode() -> str:
    """The mode randomized layers run in here: ``"random"``, ``"exact"`` or ``"repeat"``."""
    return getattr(_local, "mode", RANDOM)


def repeat_epoch() -> int:
    """Which `repeat_last_pattern` block is running (0 outside one): layers restart their replay per block."""
    return getattr(_local, "epoch", 0)


@contextlib.contextmanager
def _mode(mode: str, epoch: int | None = None) -> Iterator[None]:
    previous = (current_mode(), repeat_epoch())
    if previous[0] != EXACT:  # exact() wins over a repeat inside it: nothing random runs in an exact block
        _local.mode = mode
    if epoch is not None:
        _local.epoch = epoch
    try:
        yield
    finally:
        _local.mode, _local.epoch = previous


def exact() -> contextlib.AbstractContextManager[None]:
    """Forwards inside use the exact layers: the full activation is saved and the weight gradient is exact.

    Used for SVRG's and SGLD-CV's full-gradient pass (μ̃ must be the exact Σ_j g_j(θ̃)) and to get
    per-example gradients of a randomized model from `vr_mcmc.per_example.PerExampleGradients`::

        with vr_mcmc.rad.exact():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    """
    return _mode(EXACT)


def repeat_last_pattern() -> contextlib.AbstractContextManager[None]:
    """Forwards inside reuse each randomized layer's random patterns from its last randomized forward.

    A layer remembers the seeds of its calls since its last backward pass; inside this block its
    k-th call uses the k-th of them (and records nothing). SVRG-LD runs its closure at the
    snapshot θ̃ inside this block, so that ĝ(θ) − ĝ(θ̃) uses one pattern and its error vanishes
    as θ → θ̃ (see `vr_mcmc.rad`). Calling a layer more often than it was called then raises.
    Inside `exact()` it changes nothing (the layers stay exact).
    """
    return _mode(REPEAT, next(_epochs))
