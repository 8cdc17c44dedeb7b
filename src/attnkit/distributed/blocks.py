"""Local attention on one rectangle of a ring step, forward and backward, plus the LSE merge.

A ring's forward pass needs, per rectangle, the partial output and its log-sum-exp; its backward
needs the gradients of that rectangle given the *merged* output and LSE (FlashAttention's
backward with the global statistics: dS = P * (dP - rowsum(dO * O)) with P = exp(S - LSE)).

Two kernels:
- `reference` (any device, any dtype): `core.reference.blockwise_attention`. Its backward
  re-runs the rectangle under autograd and back-propagates the share of the merged gradient
  that reaches the partial result (`w = exp(lse_b - lse)` on the output, `w * dO.(o_b - o)` on
  the LSE), which is algebraically the same dS as above.
- `flash` (CUDA, fp16/bf16, head dim <= 256, full or diagonal-causal rectangles): PyTorch's
  FlashAttention-2 ops `aten._scaled_dot_product_flash_attention{,_backward}`, which take the
  global output and LSE directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.masks import Mask
from ..core.reference import blockwise_attention
from .pattern import CAUSAL, FULL, PARTIAL
from ..core.contract import AttnkitError

KERNELS = ("auto", "reference", "flash")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge and gradient accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flash_why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> Optional[str]:
    if not q.is_cuda:
        return "flash runs on CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash needs fp16/bf16, got {q.dtype}"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] % 8 or q.shape[-1] > 256:
        return "flash needs D == Dv, a multiple of 8, at most 256"
    if kind == PARTIAL:
        return "flash cannot apply a window/sink mask"
    if kind == CAUSAL and q.shape[1] != k.shape[1]:
        return "flash causal needs Tq == Tk"
    return None


def pick_kernel(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> str:
    if kernel == "reference":
        return "reference"
    reason = flash_why_not(q, k, v, kind)
    if kernel == "flash" and reason is not None and kind != PARTIAL:
        raise AttnkitError(f"backend: 'flash' cannot run this ring: {reason}")
    return "flash" if reason is None else "reference"


def _expand(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hq, D] (GQA heads repeated for kernels without GQA)."""
    g = hq // x.shape[2]
    return x if g == 1 else x.repeat_interleave(g, dim=2)


def _fold(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, T, Hq, D] -> [B, T, Hkv, D]: sum the gradients of repeated GQA heads."""
    B, T, Hq, D = dx.shape
    return dx if Hq == hkv else dx.view(B, T, hkv, Hq // hkv, D).sum(3)


_FLASH_META: dict[torch.device, tuple] = {}


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kind: str,
            mask: Optional[Mask], kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`q: [B, n, Hq, D]`, `k: [B, m, Hkv, D]`, `v: [B, m, Hkv, Dv]` -> `(out [B, n, Hq, Dv], lse [B, Hq, n])`."""
    if pick_kernel(kernel, q, k, v, kind) == "flash":
        hq = q.shape[2]
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), _expand(k, hq).transpose(1, 2), _expand(v, hq).transpose(1, 2),
            0.0, kind == CAUSAL, False, scale=scale)
        _FLASH_META[q.device] = (res[2], res[3], res[6], res[7])
        return res[0].transpose(1, 2), res[1][..., : q.shape[1]].float()
    with torch.no_grad():
        return blockwise_attention(q, k, v, causal=kind == CAUSAL, scale=scale, mask=mask if kind == PARTIAL else None)


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, scale: float, kind: str, mask: Optional[Mask],
             kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one rectangle given the merged `out: [B, n, Hq, Dv]` and `lse: [B, Hq, n]` of
    its query rows and their `dout`; returns `dq`, `dk`, `dv` shaped like `q`, `k`, `v`."""
    hq, hkv = q.shape[2], k.shape[2]
    if pick_kernel(kernel, q, k, v, kind) == "flash":
        cq, ck, seed, offset = _FLASH_META[q.device]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.transpose(1, 2), q.transpose(1, 2), _expand(k, hq).transpose(1, 2), _expand(v, hq).transpose(1, 2),
            out.transpose(1, 2), lse.float().contiguous(), cq, ck, q.shape[1], k.shape[1], 0.0, kind == CAUSAL,
            seed, offset, scale=scale)
        return dq.transpose(1, 2), _fold(dk.transpose(1, 2), hkv), _fold(dv.transpose(1, 2), hkv)
    cd = accum_dtype(q.dtype)
    with torch.enable_grad():
        qs, ks, vs = (x.detach().requires_grad_(True) for x in (q, k, v))
        ob, lb = blockwise_attention(qs, ks, vs, causal=kind == CAUSAL, scale=scale,
                                     mask=mask if kind == PARTIAL else None)
        lse_c = lse.to(cd)
        w = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), torch.exp(lb.detach().to(cd) - lse_c))
        w_t = w.transpose(1, 2).unsqueeze(-1)  # [B, n, Hq, 1]
        d = dout.to(cd)
        g_out = d * w_t
        g_lse = w * (d * (ob.detach().to(cd) - out.to(cd))).sum(-1).transpose(1, 2)
        dq, dk, dv = torch.autograd.grad((ob, lb), (qs, ks, vs), (g_out.to(ob.dtype), g_lse.to(lb.dtype)))
    return dq, dk, dv


def merge_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In place: fold a partial result into the accumulators by their log-sum-exp.

    `acc_out: [B, n, H, Dv]` and `acc_lse: [B, H, n]` in the accumulation dtype (views of the
    full accumulators are fine); `out_b`, `lse_b` the partial result for the same rows."""
    lse_b = lse_b.to(acc_lse.dtype)
    new = torch.logaddexp(acc_lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_old = torch.exp(acc_lse - safe).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    acc_out.copy_(acc_out * w_old + out_b.to(acc_out.dtype) * w_new)
    acc_lse.copy_(new)


__all__ = ["CAUSAL", "FULL", "KERNELS", "PARTIAL", "accum_dtype", "backward", "forward", "merge_"]
