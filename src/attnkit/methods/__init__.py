"""Mechanisms: one module per method, each an options dataclass plus its selection policy.

Importing this package registers every method with `attnkit.registry`.
"""

from . import dense, dilated, sliding_window, strided  # noqa: F401  (registration)

__all__ = ["dense", "dilated", "sliding_window", "strided"]
