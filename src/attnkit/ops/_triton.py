"""The `triton` backend of the sparse executor: adapter from a validated call to `kernels.sparse`.

Serves every `KVSelection` shape (block-level, per-token `q_block == 1`, token-level
`k_block == 1`; Hsel in Hq / Hkv / 1; varlen; Tq != Tk) in fp16 / bf16 / fp32 with head dims up to
128, on CUDA (or on the CPU under `TRITON_INTERPRET=1`). Mask predicates are not compiled into
the kernels: calls with `mask=` go to `flex` or `reference`.
"""

from __future__ import annotations

from typing import Any, Optional

from .. import kernels
from ..core.contract import AttentionCall
from ..core.masks import Mask
from ..core.selection import KVSelection
from ._backends import finish

_DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 128


def triton_why_not(call: AttentionCall, selection: KVSelection, mask: Optional[Mask] = None) -> Optional[str]:
    """None when the Triton sparse kernels can serve the call, else the reason (no Triton import
    happens unless the device can run it)."""
    if mask is not None:
        return "mask predicates are not compiled into the Triton kernels (use flex or reference)"
    reason = kernels.device_ok(call.device.type)
    if reason:
        return reason
    if str(call.dtype).replace("torch.", "") not in _DTYPES:
        return f"dtype {call.dtype} not supported (fp16, bf16, fp32)"
    if call.head_dim > MAX_HEAD_DIM or call.head_dim_v > MAX_HEAD_DIM:
        return f"head dim {call.head_dim}/{call.head_dim_v} > {MAX_HEAD_DIM}"
    return None


def run_triton(call: AttentionCall, selection: KVSelection) -> Any:
    mod = kernels.load()
    out, lse = mod.sparse_attention(call.q, call.k, call.v, selection.indices, selection.q_block, selection.k_block,
                                    causal=call.causal, scale=call.scale, cu_seqlens=call.cu_seqlens)
    return finish(call, out, lse)
