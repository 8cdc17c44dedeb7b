"""Helpers shared by attnkit's Triton kernels: jit functions used inside kernels and launch-side
arithmetic. Imported only by kernel modules (never at `import attnkit`, which must work without
Triton).

Only core builtins and jit functions of attnkit's own kernel modules appear in the kernels (no
`tl.zeros`, `tl.max`, `tl.sum`: those are jit functions of `triton.language.standard`, which are
compiled or interpreted according to how *Triton* was first imported; attnkit's kernels then run
under the interpreter even when something imported Triton before them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import config

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Triton's CPU interpreter multiplies bf16 operands of tl.dot as their raw uint16 storage (seen
# with Triton 3.9), so under the interpreter every dot runs on fp32 copies of its operands: the
# same products and fp32 accumulation that the GPU's tensor cores give.
INTERPRETED = tl.constexpr(config.triton_interpret())


@triton.jit
def max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def sum_combine(a, b):
    return a + b


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr):
    """`a @ b` in fp32 accumulation; fp32 copies of the operands under the interpreter."""
    if INTERPRETED:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PREC)
    return c


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n (and >= lo)."""
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision for operands of `dtype`: fp32 inputs must not silently run in tf32
    (the 2x rule compares with plain fp32 PyTorch)."""
    return "ieee" if dtype == torch.float32 else "tf32"
