"""Built-in per-example gradient rules; importing this package registers them."""

from . import attention, conv, embedding, embedding_bag, linear, norm  # noqa: F401
from .linear import factored_or_dense

__all__ = ["factored_or_dense"]
