"""vr_mcmc: the engine under torch_sample: per-example gradients, gradient tables, estimators."""

from importlib.metadata import PackageNotFoundError, version

from .per_example import PerExampleGradients

try:
    __version__ = version("vr-mcmc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["PerExampleGradients", "__version__"]
