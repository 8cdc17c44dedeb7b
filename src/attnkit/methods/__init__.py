"""Mechanisms: one module per method, each an options dataclass plus its selection policy.

Importing this package registers every method with `attnkit.registry`.
"""

from . import dense, dilated, sliding_window, strided  # noqa: F401  (registration)
from . import block_topk, dsa, moba, nsa, power, stochastic  # noqa: F401  (registration)
from . import flexprefill, hip, token_sparse, vertical_slash, xattention  # noqa: F401  (registration)
from . import selection_stats

inspect = selection_stats  # the module's former name (it shadowed the standard library's `inspect`)

__all__ = ["block_topk", "dense", "dilated", "dsa", "flexprefill", "hip", "inspect", "moba", "nsa", "power",
           "selection_stats", "sliding_window", "stochastic", "strided", "token_sparse", "vertical_slash", "xattention"]
