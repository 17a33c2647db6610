"""vr_mcmc: the engine under torch_sample: per-example gradients, gradient tables, estimators, and the chain
manager `sample` (ArviZ output, checkpoint/resume).

The public names are imported on first use (PEP 562), so that ``import vr_mcmc`` (and ``vr-mcmc --help``)
does not pay for importing torch."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("vr-mcmc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# public name -> the module that defines it
_LAZY = {"CheckpointError": ".chains", "sample": ".chains", "PerExampleGradients": ".per_example",
         "PosteriorEnsemble": ".ensemble", "Recorder": ".recorder"}

__all__ = ["CheckpointError", "PerExampleGradients", "PosteriorEnsemble", "Recorder", "__version__", "sample"]

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from .chains import CheckpointError, sample
    from .ensemble import PosteriorEnsemble
    from .per_example import PerExampleGradients
    from .recorder import Recorder


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    else:
        try:  # a submodule used as an attribute after a bare `import vr_mcmc` (vr_mcmc.chains, vr_mcmc.data, ...)
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
