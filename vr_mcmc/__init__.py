"""vr_mcmc: the engine under torch_sample: per-example gradients, gradient tables, estimators, and the chain
manager `sample` (ArviZ output, checkpoint/resume)."""

from importlib.metadata import PackageNotFoundError, version

from .chains import CheckpointError, sample
from .per_example import PerExampleGradients
from .recorder import Recorder

try:
    __version__ = version("vr-mcmc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["CheckpointError", "PerExampleGradients", "Recorder", "__version__", "sample"]
