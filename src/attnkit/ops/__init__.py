"""Executors: one function per op, backends behind it (DESIGN.md section 5)."""

from .decode import decode_attention
from .dense import dense_attention
from .masked import masked_attention
from .sparse import sparse_attention

__all__ = ["decode_attention", "dense_attention", "masked_attention", "sparse_attention"]
