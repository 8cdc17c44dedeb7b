"""The contract, selections, masks and exact references. Imports nothing else of attnkit."""

from . import masks
from .contract import (
    AttentionCall,
    AttnkitError,
    BackendError,
    OptionError,
    from_bhtd,
    to_bhtd,
    validate_attention,
)
from .oracle import naive_attention
from .reference import blockwise_attention
from .selection import KVSelection

__all__ = [
    "AttentionCall", "AttnkitError", "BackendError", "OptionError", "KVSelection", "blockwise_attention",
    "from_bhtd", "masks", "naive_attention", "to_bhtd", "validate_attention",
]
