"""Local attention on one rectangle of a ring step, forward and backward, plus the LSE merge.

A ring's forward pass needs, per rectangle, the partial output and its log-sum-exp; its backward
needs the gradients of that rectangle given the *merged* output and LSE (FlashAttention's
backward with the global statistics: dS = P * (dP - rowsum(dO * O)) with P = exp(S - LSE)).
Every kernel below takes those global statistics, so the ring never re-runs a forward pass in
its backward.

Kernels, fastest first, declared as `ops.dispatch.Backend` records (`DECLARED`) and chosen by the
one dispatcher through `pick_kernel`, which looks at the call's device, dtype, head dims and
rectangle kind, not at tensors, so its choice is cached:
- `cudnn` (CUDA sm90+, fp16/bf16, head dim <= 128): PyTorch's cuDNN attention ops
  `aten._scaled_dot_product_cudnn_attention{,_backward}` with the log-sum-exp requested.
- `flash` (CUDA sm80+, fp16/bf16, head dim <= 256): PyTorch's FlashAttention-2 ops
  `aten._scaled_dot_product_flash_attention{,_backward}`.
- `reference` (any device, any dtype, any mask): `core.reference.blockwise_attention`. Its
  backward re-runs the rectangle under autograd and back-propagates the share of the merged
  gradient that reaches the partial result (`w = exp(lse_b - lse)` on the output,
  `w * dO.(o_b - o)` on the LSE), which is algebraically the same dS as above.

The fused kernels serve full and diagonal-causal rectangles; a window or sink edge (a partial
rectangle) runs on the reference, whose mask is evaluated tile by tile.

`merge_` folds partial results by LSE in place (the ring's accumulators, outside autograd);
`merge` is the same merge with autograd, for callers whose parts keep their own executors'
backward (the selection-aware exchange), each part receiving `partial_share` of the gradients.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ..core.contract import AttnkitError, compute_dtype
from ..core.masks import Mask
from ..core.reference import blockwise_attention
from ..ops.dispatch import Backend, Check
from ..ops.dispatch import choose as dispatch_choose
from .pattern import CAUSAL, FULL, PARTIAL

KERNELS = ("auto", "cudnn", "flash", "reference")


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a rectangle runs on, and why the faster ones were passed over."""

    name: str
    why_not: tuple[tuple[str, str], ...] = ()  # (kernel, reason) for each faster kernel not taken

    def describe(self) -> str:
        skipped = "; ".join(f"{k}: {r}" for k, r in self.why_not)
        return self.name + (f" ({skipped})" if skipped else "")


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


# Fused kernels that raised at run time on a device (e.g. a cuDNN build without attention
# support): `auto` passes them over from then on, with the error as the reason.
_FAILED: dict[tuple[str, torch.device], str] = {}


@dataclass(frozen=True)
class Rectangle:
    """What the dispatcher reads of one rectangle's call (no tensors: choices are cached by it)."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    tq: int
    tk: int
    return_lse: bool = True  # the ring merges partial results by their LSE
    varlen: bool = False
    requires_grad: bool = False  # every kernel has the ring's backward


def _fused_supports(kernel: str) -> Check:
    """What the record's data cannot say about fused `kernel` (opts: the rectangle kind)."""
    def supports(rect: Rectangle, kind: str) -> Optional[str]:
        if (kernel, rect.device) in _FAILED:
            return _FAILED[(kernel, rect.device)]
        if kind == PARTIAL:
            return f"{kernel} cannot apply a window/sink mask"
        if kind == CAUSAL and rect.tq != rect.tk:
            return f"{kernel} causal needs Tq == Tk"
        if rect.head_dim != rect.head_dim_v or rect.head_dim % 8:
            return f"{kernel} needs D == Dv, a multiple of 8"
        if rect.device.type != "cuda":
            return None  # the record's devices say it; there is no GPU to ask about
        major, _ = _capability(rect.device)
        if kernel == "cudnn" and major < 9:
            return f"cudnn runs on sm90+ here, this GPU is sm{major}x"
        if kernel == "flash" and major < 8:
            return f"flash needs sm80+, this GPU is sm{major}x"
        return None

    return supports


def _declared() -> tuple[Backend, ...]:
    fused = dict(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16))
    return (
        Backend("cudnn", lambda rect, kind: "cudnn", supports=_fused_supports("cudnn"), requires=("cudnn",),
                max_head_dim=128, **fused),
        Backend("flash", lambda rect, kind: "flash", supports=_fused_supports("flash"), max_head_dim=256, **fused),
        Backend("reference", lambda rect, kind: "reference"),
    )


# the kernels in the order `auto` tries them; a record's `run` names its kernel (`forward` and
# `backward` run it), since a choice is made per rectangle shape and cached, not per tensor
DECLARED = _declared()


def why_not(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, head_dim_v: int, kind: str,
            tq: int, tk: int) -> Optional[str]:
    """None if `kernel` can run a `kind` rectangle of `tq` queries by `tk` keys, else every reason."""
    backend = next(b for b in DECLARED if b.name == kernel)
    return backend.why_not(Rectangle(device, dtype, head_dim, head_dim_v, tq, tk), kind)  # type: ignore[arg-type]


def pick_kernel(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, head_dim_v: int,
                kind: str, tq: int, tk: int) -> KernelChoice:
    """The kernel for one rectangle: `requested` ("auto", "cudnn", "flash", "reference") on a call
    with the given device, dtype, head dims, rectangle kind (FULL, CAUSAL, PARTIAL) and lengths.

    `auto` takes the first fused kernel that can run it, else the reference. A named fused kernel
    that cannot run a full or causal rectangle raises (the caller asked for it); partial
    rectangles always fall back to the reference, since no fused kernel takes a mask. Cached (the
    ring asks per call and step; a fused kernel failing at run time clears the cache)."""
    return _pick(requested, device, dtype, head_dim, head_dim_v, kind, tq, tk)


@functools.lru_cache(maxsize=4096)
def _pick(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, head_dim_v: int,
          kind: str, tq: int, tk: int) -> KernelChoice:
    """`pick_kernel`, memoised; `_fallible` clears it when a fused kernel fails. The choice is the
    one dispatcher's (`ops.dispatch.choose`) over `DECLARED`."""
    if requested not in KERNELS:
        raise AttnkitError(f"backend: expected one of {list(KERNELS)} for the ring's blocks, got {requested!r}")
    rect = Rectangle(device, dtype, head_dim, head_dim_v, tq, tk)
    exp = dispatch_choose("distributed.ring_block", DECLARED, rect, kind, requested)  # type: ignore[arg-type]
    if requested == "auto":  # every faster kernel passed over, with its reasons
        skipped = tuple((n, why) for n, ok, why in exp.rows[: [r[0] for r in exp.rows].index(exp.chosen)])
        return KernelChoice(exp.chosen, skipped)  # type: ignore[arg-type]
    if exp.chosen is not None:
        return KernelChoice(exp.chosen)
    reason = next(why for n, _, why in exp.rows if n == requested)
    if kind != PARTIAL:
        raise AttnkitError(f"backend: {requested!r} cannot run this ring: {reason}")
    return KernelChoice("reference", ((requested, reason),))


def choose(requested: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> KernelChoice:
    return pick_kernel(requested, q.device, q.dtype, q.shape[-1], v.shape[-1], kind, q.shape[1], k.shape[1])


def _expand(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hq, D] (GQA heads repeated for kernels without GQA)."""
    g = hq // x.shape[2]
    return x if g == 1 else x.repeat_interleave(g, dim=2)


def _fold(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, T, Hq, D] -> [B, T, Hkv, D]: sum the gradients of repeated GQA heads (in float32)."""
    B, T, Hq, D = dx.shape
    return dx if Hq == hkv else dx.view(B, T, hkv, Hq // hkv, D).sum(3, dtype=torch.float32)


# The fused backward ops take the forward's bookkeeping outputs (cumulative lengths, random-number
# state); with dense inputs and dropout 0 they are never read, but they must be what the forward
# op returns: the last ones seen per kernel and device.
_FORWARD_EXTRAS: dict[tuple[str, torch.device], tuple] = {}


def _extras(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple:
    """The forward's bookkeeping outputs when this kernel's forward has not run on this device (its
    backward serving another kernel's forward): one tiny forward call provides them."""
    _forward(name, q[:, :1], k[:, :1], v[:, :1], scale, FULL, None)
    return _FORWARD_EXTRAS[(name, q.device)]


def _bhsd(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.transpose(1, 2) for x in xs]


def _fallible(run, kernel: str, name: str, device: torch.device, *args):
    """Run kernel `name`; under `auto`, a fused kernel that raises is recorded and the next one runs."""
    try:
        return run(name, *args)
    except RuntimeError as e:
        if kernel != "auto" or name == "reference":
            raise
        _FAILED[(name, device)] = f"{name} failed here: {str(e).splitlines()[0][:200]}"
        _pick.cache_clear()
        return None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kind: str,
            mask: Optional[Mask], kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`q: [B, n, Hq, D]`, `k: [B, m, Hkv, D]`, `v: [B, m, Hkv, Dv]` -> `(out [B, n, Hq, Dv], lse [B, Hq, n])`.

    `out` is in the input dtype, `lse` in float32 (float64 for float64 inputs)."""
    while True:
        res = _fallible(_forward, kernel, choose(kernel, q, k, v, kind).name, q.device, q, k, v, scale, kind, mask)
        if res is not None:
            return res


def _forward(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kind: str,
             mask: Optional[Mask]) -> tuple[torch.Tensor, torch.Tensor]:
    causal = kind == CAUSAL
    if name == "reference":
        with torch.no_grad():
            return blockwise_attention(q, k, v, causal=causal, scale=scale, mask=mask if kind == PARTIAL else None)
    hq = q.shape[2]
    qh, kh, vh = _bhsd(q, _expand(k, hq), _expand(v, hq))
    if name == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, causal, False,
                                                                 scale=scale)
        _FORWARD_EXTRAS[("cudnn", q.device)] = (res[2], res[3], res[6], res[7])
        lse = res[1].reshape(res[1].shape[0], res[1].shape[1], -1)[..., : q.shape[1]]
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)
        _FORWARD_EXTRAS[("flash", q.device)] = (res[2], res[3], res[6], res[7])
        lse = res[1][..., : q.shape[1]]
    return res[0].transpose(1, 2), lse.float()


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, scale: float, kind: str, mask: Optional[Mask],
             kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one rectangle given the merged `out: [B, n, Hq, Dv]` and `lse: [B, Hq, n]` of
    its query rows and their `dout`; returns `dq`, `dk`, `dv` shaped like `q`, `k`, `v` (dk, dv
    in float32 when GQA heads were folded, else the kernel's dtype). Any kernel's backward serves
    any kernel's forward: all take the merged statistics."""
    while True:
        res = _fallible(_backward, kernel, choose(kernel, q, k, v, kind).name, q.device, dout, q, k, v, out, lse,
                        scale, kind, mask)
        if res is not None:
            return res


def _backward(name: str, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, scale: float, kind: str,
              mask: Optional[Mask]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hq, hkv = q.shape[2], k.shape[2]
    causal = kind == CAUSAL
    if name != "reference":
        cq, ck, seed, offset = _FORWARD_EXTRAS.get((name, q.device)) or _extras(name, q, k, v, scale)
        n, m = q.shape[1], k.shape[1]
        do_h, q_h, k_h, v_h, o_h = _bhsd(dout, q, _expand(k, hq), _expand(v, hq), out)
        if name == "cudnn":
            stats = lse.float().unsqueeze(-1).contiguous()
            dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                do_h, q_h, k_h, v_h, o_h, stats, seed, offset, None, cq, ck, n, m, 0.0, causal, scale=scale)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                do_h, q_h, k_h, v_h, o_h, lse.float().contiguous(), cq, ck, n, m, 0.0, causal, seed, offset,
                scale=scale)
        return dq.transpose(1, 2), _fold(dk.transpose(1, 2), hkv), _fold(dv.transpose(1, 2), hkv)
    cd = compute_dtype(q.dtype)
    with torch.enable_grad():
        qs, ks, vs = (x.detach().requires_grad_(True) for x in (q, k, v))
        ob, lb = blockwise_attention(qs, ks, vs, causal=causal, scale=scale, mask=mask if kind == PARTIAL else None)
        g_out, g_lse = partial_share(dout.to(cd), out.to(cd), lse.to(cd), ob.detach(), lb.detach())
        dq, dk, dv = torch.autograd.grad((ob, lb), (qs, ks, vs), (g_out.to(ob.dtype), g_lse.to(lb.dtype)))
    return dq, dk, dv


def partial_share(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor, dlse: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients reaching one partial result `(out_b, lse_b)` of a merge by LSE, given the
    merged `out: [B, n, H, Dv]`, `lse: [B, H, n]` and their gradients `dout` (and `dlse`, if any):
    with `w = exp(lse_b - lse)` (0 where no key was seen), `w * dout` on the output and
    `w * (dlse + rowsum(dout * (out_b - out)))` on the LSE. Computed in the dtype of `out`."""
    cd = out.dtype
    w = torch.where(torch.isinf(lse), torch.zeros_like(lse), torch.exp(lse_b.to(cd) - lse))
    g_lse = (dout * (out_b.to(cd) - out)).sum(-1).transpose(1, 2)
    if dlse is not None:
        g_lse = g_lse + dlse.to(cd)
    return dout * w.transpose(1, 2).unsqueeze(-1), w * g_lse


class _Merge(torch.autograd.Function):
    """`merge_` of several partial results, differentiable: each part receives `partial_share`."""

    @staticmethod
    def forward(ctx, *parts: torch.Tensor):  # type: ignore[no-untyped-def]
        outs, lses = parts[0::2], parts[1::2]
        cd = compute_dtype(outs[0].dtype)
        acc_out, acc_lse = outs[0].to(cd).clone(), lses[0].to(cd).clone()
        for ob, lb in zip(outs[1:], lses[1:]):
            merge_(acc_out, acc_lse, ob, lb)
        ctx.save_for_backward(acc_out, acc_lse, *parts)
        ctx.dtypes = [p.dtype for p in parts]
        return acc_out.to(outs[0].dtype), acc_lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dlse: Optional[torch.Tensor]):  # type: ignore[no-untyped-def]
        out, lse, *parts = ctx.saved_tensors
        grads = []
        for ob, lb in zip(parts[0::2], parts[1::2]):
            g_out, g_lse = partial_share(dout.to(out.dtype), out, lse, ob, lb, dlse)
            grads += [g_out.to(ob.dtype), g_lse.to(lb.dtype)]
        return tuple(grads)


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial results `(out [B, n, H, Dv], lse [B, H, n])` of the same rows over disjoint key sets
    -> their merge by LSE `(out in the first part's dtype, lse float32/64)`, with autograd (each
    part gets its share of the merged gradients, so every part keeps its own kernel's backward)."""
    flat = [t for part in parts for t in part]
    return _Merge.apply(*flat)


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


class Rows:
    """Which rows `[0, n)` of an accumulator hold something yet, as sorted disjoint intervals.

    The ring uses it to *write* the first contribution to a row instead of merging it into zeros,
    so a rank whose rows each get one contribution (world size 1; a window that keeps only the
    diagonal) does no merge and no accumulator round trip at all."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.spans: list[tuple[int, int]] = []

    def covered(self, lo: int, hi: int) -> int:
        return sum(max(0, min(hi, b) - max(lo, a)) for a, b in self.spans)

    def gaps(self, lo: int, hi: int) -> list[tuple[int, int]]:
        out, at = [], lo
        for a, b in self.spans:
            if b <= at or a >= hi:
                continue
            if a > at:
                out.append((at, a))
            at = max(at, b)
        if at < hi:
            out.append((at, hi))
        return out

    def add(self, lo: int, hi: int) -> None:
        spans = sorted(self.spans + [(lo, hi)])
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.spans = merged

    def full(self) -> bool:
        return self.spans == [(0, self.n)] or self.n == 0


class OutputAccumulator:
    """The merged output and LSE of this rank's query rows over all partial results.

    A result covering every row while nothing is held yet is kept as the kernel returned it (no
    copy); anything else goes into float32 (float64) buffers, written on a row's first
    contribution and merged by LSE after that."""

    def __init__(self, B: int, T: int, H: int, Dv: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = (B, T, H, Dv), dtype, device
        self.cd = compute_dtype(dtype)
        self.rows = Rows(T)
        self.direct: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.out: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None

    def _buffers(self) -> None:
        if self.out is not None:
            return
        B, T, H, Dv = self.shape
        self.out = torch.empty(B, T, H, Dv, dtype=self.cd, device=self.device)
        self.lse = torch.empty(B, H, T, dtype=self.cd, device=self.device)
        if self.direct is not None:
            self.out.copy_(self.direct[0])
            self.lse.copy_(self.direct[1])
            self.direct = None

    def fold(self, lo: int, hi: int, ob: torch.Tensor, lb: torch.Tensor) -> None:
        T = self.shape[1]
        if self.direct is None and self.out is None and lo == 0 and hi == T:
            self.direct = (ob, lb)
            self.rows.add(lo, hi)
            return
        self._buffers()
        assert self.out is not None and self.lse is not None
        gaps = self.rows.gaps(lo, hi)
        if gaps == [(lo, hi)]:
            self.out[:, lo:hi].copy_(ob)
            self.lse[:, :, lo:hi].copy_(lb)
        else:
            for a, b in gaps:  # rows seen for the first time: start them empty
                self.out[:, a:b].zero_()
                self.lse[:, :, a:b].fill_(float("-inf"))
            merge_(self.out[:, lo:hi], self.lse[:, :, lo:hi], ob, lb)
        self.rows.add(lo, hi)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(out in the input dtype, lse float32/64)`; rows that saw no key: output 0, LSE -inf."""
        if self.direct is not None:
            ob, lb = self.direct
            return ob.to(self.dtype).contiguous(), lb.to(self.cd).contiguous()
        self._buffers()
        assert self.out is not None and self.lse is not None
        for a, b in self.rows.gaps(0, self.shape[1]):
            self.out[:, a:b].zero_()
            self.lse[:, :, a:b].fill_(float("-inf"))
        return self.out.to(self.dtype), self.lse


class GradAccumulator:
    """A gradient summed over rectangles along dim 1: one contribution covering every row is kept
    as is; otherwise contributions add into a float32 (float64) buffer."""

    def __init__(self, like: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.direct: Optional[torch.Tensor] = None
        self.buf: Optional[torch.Tensor] = None

    def _buffer(self) -> torch.Tensor:
        if self.buf is None:
            self.buf = torch.zeros(self.shape, dtype=compute_dtype(self.dtype), device=self.device)
            if self.direct is not None:
                self.buf += self.direct
                self.direct = None
        return self.buf

    def add(self, lo: int, hi: int, g: torch.Tensor) -> None:
        if self.buf is None and self.direct is None and lo == 0 and hi == self.shape[1]:
            self.direct = g
            return
        self._buffer()[:, lo:hi] += g

    def add_tensor(self, lo: int, hi: int, g: torch.Tensor) -> None:
        """Add `g` (any dtype) to rows `[lo, hi)`, forcing the buffer."""
        self._buffer()[:, lo:hi] += g

    def result(self) -> torch.Tensor:
        if self.direct is not None:
            return self.direct.to(self.dtype)
        return self._buffer().to(self.dtype)


__all__ = ["CAUSAL", "FULL", "KERNELS", "KernelChoice", "OutputAccumulator", "GradAccumulator", "PARTIAL",
           "DECLARED", "Rectangle", "backward", "choose", "forward", "merge", "merge_", "partial_share", "pick_kernel",
           "why_not"]
