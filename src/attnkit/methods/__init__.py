"""Mechanisms: one module per method, each an options dataclass plus its selection policy.

Importing this package registers every method with `attnkit.registry`.
"""

from . import dense, dilated, sliding_window, strided  # noqa: F401  (registration)
from . import block_topk, dsa, inspect, moba, nsa, power, stochastic  # noqa: F401  (registration)

__all__ = ["block_topk", "dense", "dilated", "dsa", "inspect", "moba", "nsa", "power", "sliding_window", "stochastic", "strided"]
