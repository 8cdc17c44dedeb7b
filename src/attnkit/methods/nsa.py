"""`nsa`: Native Sparse Attention (Yuan et al. 2025; "Optimizing NSA").

Three branches over the same queries, mixed per token and query head by caller-supplied gates
`g_cmp, g_slc, g_swa: [B, Tq, Hq]` (a missing gate drops its branch):

1. compressed: attention over mean-pooled keys / values of the complete blocks of `block_size`
   (NSA's learnable compression MLP replaced by the mean, stride = block length); block c is
   visible iff all its keys are (`(c + 1) * block_size - 1 <= i` under causality);
2. selected: the `topk` key blocks with the highest compressed-attention probability averaged over
   the query heads of a KV group (one selection per KV group), where the first block, the own
   block and the previous block are always selected and count toward `topk` (the paper's "1
   initial + 2 local"); causal inside blocks;
3. sliding window: the last `window` keys (`i - j < window`).

`out = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`. Gradients reach q, k, v (through all three
branches, the pooling included) and the gates; the selection itself is not differentiated. The
mix has no single softmax, so NSA returns no LSE.

Selection (the selected branch): `KVSelection(indices [B, Hkv, Tq, S], q_block=1, k_block=block_size)`,
`S = min(max(topk, 3), Nk)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from ..core.checks import check_int, check_tensor_shape, check_tensor_type
from ..core import masks
from ..core.contract import AttentionCall, OptionError
from ..core.masks import Mask
from ..core.reference import blockwise_attention
from ..ops.executors import (cached_block_mask, flex_attention_lse, flex_why_not_mask, prefix_block_mask, run_flex_mask,
                             run_triton, triton_why_not)
from ..core.selection import KVSelection, cdiv
from ..core.topk import streaming_topk, tile_budget, tile_sizes
from ..registry import Backend, Capabilities, MethodOptions, register_selection
from .gemm import bmm_f32, compute_dtype, half_gemm
from .. import config
from .router import Packing, compact_rows, kernel_variant, routed_kernel, seq_view

GATES = ("g_cmp", "g_slc", "g_swa")


@dataclass(frozen=True)
class NsaOptions(MethodOptions):
    block_size: int
    topk: int
    window: Optional[int] = None  # required with g_swa
    g_cmp: Optional[torch.Tensor] = None  # [B, Tq, Hq]
    g_slc: Optional[torch.Tensor] = None
    g_swa: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, 1)
        check_int("topk", self.topk, 1)
        if self.window is not None:
            check_int("window", self.window, 1)
        for name in GATES:
            check_tensor_type(name, getattr(self, name), optional=True)
        if self.g_swa is not None and self.window is None:
            raise OptionError("window: required (an int >= 1) when the sliding-window gate g_swa is given")

    def check_call(self, call: AttentionCall) -> None:
        for name in GATES:
            g = getattr(self, name)
            if g is not None:
                check_tensor_shape(name, g, (call.batch, call.tq, call.hq), "[B, Tq, Hq]", call)


def _compressed_mask(block: int, num_cmp: int, tk: int, k_len: torch.Tensor, causal: bool) -> Mask:
    """Visibility of compressed block c for a query whose position in compressed coordinates is q
    (the executor aligns queries to the `num_cmp` compressed keys; `+ tk - num_cmp` undoes that)."""
    offset = tk - num_cmp

    def fn(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        last = (c + 1) * block - 1  # last key of block c
        ok = last < k_len.to(c.device)[b]
        return ok & (last <= q + offset) if causal else ok

    # the name holds every scalar the predicate closes over; `k_len` (varlen lengths) is not in it,
    # so the mask must not go through a name-keyed block-mask cache (only the reference path uses it)
    return Mask(fn, f"nsa_compressed(block={block}, num_cmp={num_cmp}, tk={tk}, causal={causal})")


def _compressed_block_mask(block: int, tk: int, tq: int, nc: int, causal: bool, device: torch.device):
    """The FlexAttention BlockMask of branch 1: `tq` queries over the `nc = tk // block` pooled keys.

    Query i sits at key position `p = i + tk - tq` (bottom-right aligned in the *uncompressed* keys),
    so under causality it sees the first `floor((p + 1) / block)` compressed blocks (block c iff
    `(c + 1) * block - 1 <= p`), and every one of them otherwise. That prefix pattern becomes a
    BlockMask directly (`prefix_block_mask`: O(tq / 128 * nc / 128) work, never a `tq x nc` mask),
    cached per shape; `nc` need not be a multiple of FlexAttention's block (`seq_lengths`)."""
    shift = tk - tq + 1  # p + 1 = i + shift
    if causal:
        def num_visible(i: torch.Tensor) -> torch.Tensor:
            return torch.div(i + shift, block, rounding_mode="floor")

        def mask_mod(b, h, i, c):  # (c + 1) * block - 1 <= p; c < nc is FlexAttention's own bound
            return (c + 1) * block <= i + shift
    else:
        num_visible, mask_mod = (lambda i: torch.full_like(i, nc)), None  # noqa: E731
    key = ("nsa_compressed", block, shift if causal else None, tq, nc, str(device))
    return cached_block_mask(key, lambda: prefix_block_mask(num_visible, mask_mod, tq, nc, device))


def _compressed_flex(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, block: int, tk: int, causal: bool,
                     scale: float, flex: Optional[Callable]) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch 1 on FlexAttention: `q [N, Tq, Hq, D]` over the pooled `kc, vc [N, nc, Hkv, *]` (GQA through
    `enable_gqa`): `(out [N, Tq, Hq, Dv], lse [N, Hq, Tq])`."""
    Tq, nc = q.shape[1], kc.shape[1]
    bm = _compressed_block_mask(block, tk, Tq, nc, causal, q.device)
    out, lse = flex_attention_lse(q, kc, vc, bm, scale, flex)
    n_empty = max(0, min(Tq, block - 1 - (tk - Tq))) if causal else 0  # the first rows see no complete block
    if n_empty:  # FlexAttention already gives them out 0, LSE -inf; pin the LSE (it drives the selection)
        lse = lse.masked_fill(torch.arange(Tq, device=lse.device) < n_empty, float("-inf"))
    return out, lse


def compressed_branch(call: AttentionCall, block: int, v: Optional[torch.Tensor] = None, *,
                      flex: Union[bool, Callable] = False) -> tuple[torch.Tensor, torch.Tensor, Optional[Packing]]:
    """Branch 1: `(out [B, Tq, Hq, Dv], lse_padded [N, Hq, Tq'], packing)`, differentiable (q, k, v, through
    the pooling; the LSE too). The LSE is the natural log, float32 (float64 for float64), `-inf` for a
    query that sees no complete block, whose output row is 0.

    `flex=False` runs on the reference executor (`blockwise_attention`). `flex=True` runs the attention
    over the pooled keys on compiled FlexAttention (the GPU path); a callable is used in place of the
    compiled `flex_attention` (tests pass the eager one). Varlen calls always take the reference: the
    branch runs on the padded per-sequence batch, `lse_padded` stays in that layout (the selection
    policy's), `out` is packed back. `v` overrides the values (selection-only runs)."""
    v = call.v if v is None else v
    packing = Packing(call.cu_seqlens, call.device) if call.varlen else None
    q, k, vv = (call.q, call.k, v) if packing is None else (packing.pad(call.q), packing.pad(call.k), packing.pad(v))
    N, Tq, Hq, _ = q.shape
    Tk = k.shape[1]
    nc = Tk // block
    k_len = packing.lengths if packing is not None else torch.full((N,), Tk, dtype=torch.int64, device=q.device)
    if nc == 0:
        out = torch.zeros(N, Tq, Hq, vv.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full((N, Hq, Tq), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    else:
        cd = compute_dtype(q.dtype)
        kc = k[:, : nc * block].to(cd).unflatten(1, (nc, block)).mean(2).to(k.dtype)  # [N, nc, Hkv, D]
        vc = vv[:, : nc * block].to(cd).unflatten(1, (nc, block)).mean(2).to(vv.dtype)
        if (flex is True or callable(flex)) and packing is None:
            out, lse = _compressed_flex(q, kc, vc, block, Tk, call.causal, call.scale,
                                        None if flex is True else flex)
        else:
            mask = _compressed_mask(block, nc, Tk, k_len, call.causal)
            out, lse = blockwise_attention(q, kc, vc, causal=False, scale=call.scale, mask=mask)
    if packing is not None:
        out = packing.unpad(out)
    return out, lse, packing


def selection_from_lse(call: AttentionCall, block_size: int, topk: int, lse_cmp: torch.Tensor) -> KVSelection:
    """Branch 2's selection given the compressed branch's LSE `[N, Hq, Tq']` (padded layout)."""
    return _selection(call, block_size, topk, lse_cmp)


def _selection(call: AttentionCall, block_size: int, topk: int, lse_cmp: Optional[torch.Tensor]) -> KVSelection:
    """Branch 2's selection. `lse_cmp=None`: the compressed branch's LSE is computed here, from the
    same score tiles (the logsumexp of the visible compressed scores of each row), without its output.

    Layout, so that a tile costs one matmul, one in-place pass and one reduction over its
    `[N, Hkv, R, G, C]` float32 scores (G: the query heads of a KV group, averaged): the queries are
    copied once into `qa [N, Hkv, Tq, G, Da]`, scaled, with one extra column holding `-lse` (the pooled
    keys carry a 1 there), so a tile's rows are one `[R * G, Da]` matrix per KV head and the matmul
    yields `scale * q.k - lse` directly; then `exp_` in place and a sum over the group (the mean's
    ranking). Columns that a row cannot see are masked on the `[N, Hkv, R, C]` result, not on the
    scores (a column's probability depends on its own score only). Rounding differs from
    `exp(q.k * scale - lse)` by an ulp or so: the selected set is the same up to ties."""
    view = seq_view(call)
    bs = block_size
    N, Tq, Hq, D = view.q.shape
    Hkv, G = view.k.shape[2], Hq // view.k.shape[2]
    Tk, nk, nc = view.tk, cdiv(view.tk, bs), view.tk // bs
    dev = view.q.device
    cd = compute_dtype(call.dtype)
    Da = cdiv(D + 1, 4) * 4  # D + the -lse column, padded to 16 bytes in float32
    # bf16 on CUDA: q and the compressed keys (bf16 values, as branch 1 rounds them) stay bf16 and
    # `bmm_f32` multiplies them exactly into float32 on the tensor cores; the scale and -lse are
    # applied in one pass over the tile instead of riding in the matmul.
    half = call.dtype == torch.bfloat16 and half_gemm(dev, call.dtype)
    kernel = routed_kernel(dev, call.dtype, min(max(topk, 3), nk))
    if kernel is not None:  # fused: probabilities summed over the group on chip, rows come out compact
        with torch.no_grad():
            if lse_cmp is None:  # the compressed branch's LSE (its output is not needed)
                _, lse_cmp, _ = compressed_branch(call, bs, v=call.k, flex=dev.type == "cuda" and not call.varlen)
            kc = view.k[:, : nc * bs].to(cd).unflatten(1, (nc, bs)).mean(2).to(call.dtype)  # as branch 1
            idx = kernel.group_prob_topk(view.q, kc.permute(0, 2, 3, 1), lse_cmp.detach(), view.k_len, nk,
                                         view.offset, view.causal, bs, topk, call.scale)
        return KVSelection(idx, q_block=1, k_block=bs)
    with torch.no_grad():
        kc = view.k[:, : nc * bs].to(cd).unflatten(1, (nc, bs)).mean(2).to(call.dtype)  # as branch 1
        if half:
            qh = view.q.unflatten(2, (Hkv, G)).transpose(1, 2).contiguous()  # [N, Hkv, Tq, G, D]
            kh = torch.zeros(N, Hkv, D, nk, dtype=call.dtype, device=dev)  # blocks past nc stay 0
            kh[..., :nc] = kc.permute(0, 2, 3, 1)
            kh = kh.view(N * Hkv, D, nk)
            neg_lse = torch.zeros(N, Hkv, Tq, G, dtype=cd, device=dev)
        else:
            qa = torch.empty(N, Hkv, Tq, G, Da, dtype=cd, device=dev)
            qa[..., :D].copy_(view.q.unflatten(2, (Hkv, G)).transpose(1, 2)).mul_(call.scale)
            qa[..., D:] = 0
            ka = torch.zeros(N, Hkv, Da, nk, dtype=cd, device=dev)  # [N, Hkv, Da, nk]: blocks past nc stay 0
            ka[:, :, :D, :nc] = kc.to(cd).permute(0, 2, 3, 1)
            ka[:, :, D, :] = 1
            neg_lse = qa[..., D]  # a view: writing it fills the matmul's extra column

        q_pos = view.q_pos()
        own = q_pos // bs  # [Tq]
        k_len = view.k_len.view(N, 1, 1, 1)
        per_pair = N * Hq * 2
        row_chunk, col_chunk = tile_sizes(Tq, nk, elems_per_pair=per_pair, device=dev)

        def visible(rows: slice, cols: slice) -> torch.Tensor:  # [N, 1, R, C]: compressed block c visible to row
            c = torch.arange(cols.start, cols.stop, device=dev).view(1, -1)
            last = (c + 1) * bs - 1
            vis = (last < k_len) & (c < nc)
            if view.causal:
                vis = vis & (last <= q_pos[rows].view(-1, 1))
            return vis

        def scores(rows: slice, cols: slice) -> torch.Tensor:
            """`scale * q.k + qa[..., D]` as `[N, Hkv, R, G, C]` (one batched matmul over N * Hkv)."""
            R, C = rows.stop - rows.start, cols.stop - cols.start
            if half:
                s = bmm_f32(qh[:, :, rows].reshape(N * Hkv, R * G, D), kh[..., cols]).view(N, Hkv, R, G, C)
                return torch.add(neg_lse[:, :, rows].unsqueeze(-1), s, alpha=call.scale, out=s)
            s = torch.matmul(qa[:, :, rows].reshape(N, Hkv, R * G, Da), ka[..., cols])
            return s.view(N, Hkv, R, G, C)

        def masked(rows: slice, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
            """Scaled scores, -inf where not visible (the LSE column must hold 0), and the visibility."""
            vis = visible(rows, cols)
            return scores(rows, cols).masked_fill_(~vis.unsqueeze(3), float("-inf")), vis

        def finite(lse: torch.Tensor) -> torch.Tensor:  # a row that sees no compressed block: 0
            return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

        # the LSE comes with the score tile when one tile spans every column; else a first pass over the tiles
        fused = lse_cmp is None and col_chunk >= nk
        if lse_cmp is not None:
            neg_lse.copy_(finite(lse_cmp.detach().to(cd)).reshape(N, Hkv, G, Tq).transpose(2, 3).neg())
        elif not fused:
            lse = torch.full((N, Hkv, Tq, G), float("-inf"), dtype=cd, device=dev)
            for r0 in range(0, Tq, row_chunk):
                rows = slice(r0, min(r0 + row_chunk, Tq))
                for c0 in range(0, nk, col_chunk):
                    s, _ = masked(rows, slice(c0, min(c0 + col_chunk, nk)))
                    lse[:, :, rows] = torch.logaddexp(lse[:, :, rows], torch.logsumexp(s, -1))
            neg_lse.copy_(finite(lse).neg_())
            del lse

        def score(rows: slice, cols: slice) -> torch.Tensor:  # [N, Hkv, R, C]
            if fused:  # the tile spans every column: its own logsumexp is the row's LSE
                s, vis = masked(rows, cols)
                s = s.sub_(finite(torch.logsumexp(s, -1, keepdim=True)))
            else:  # s - lse from the matmul; columns not visible are masked after the sum
                s, vis = scores(rows, cols), visible(rows, cols)
            prob = s.exp_().sum(3)  # over the group's query heads (the mean's order, G times it)
            prob = prob.masked_fill_(~vis, float("-inf"))
            c = torch.arange(cols.start, cols.stop, device=dev).view(1, -1)
            o = own[rows].view(-1, 1)
            forced = (c == 0) | (c == o) | (c == o - 1)
            return prob.masked_fill_(forced, float("inf"))

        def col_stop(rows: slice) -> int:
            # columns past the last row's own block are neither visible nor forced (block 0 always is)
            return max(1, (rows.stop - 1 + view.offset) // bs + 1) if view.causal else nk

        width = min(max(topk, 3), nk)
        _, idx = streaming_topk(score, (N, Hkv), Tq, nk, width, row_chunk=row_chunk, col_chunk=col_chunk,
                                col_stop=col_stop, dtype=cd, device=dev, max_tile_elems=tile_budget(dev) // per_pair)
        # forced blocks sort first (+inf); keep max(topk, number of forced blocks) per row
        num_forced = 1 + own.clamp(0, 2)  # {0} ; {0, 1} ; {0, own - 1, own}
        keep = torch.arange(width, device=dev).view(1, -1) < num_forced.clamp_min(topk).view(-1, 1)
        idx = torch.where(keep, idx, torch.full_like(idx, -1))
    return KVSelection(compact_rows(idx, width), q_block=1, k_block=bs)


def policy(call: AttentionCall, opts: NsaOptions) -> KVSelection:
    """Branch 2's selection of a validated call (no gradients): the compressed branch's LSE is computed
    from the selection's own score tiles (its output is not needed)."""
    return _selection(call, opts.block_size, opts.topk, None)


def run(call: AttentionCall, opts: NsaOptions, gpu: bool = False) -> torch.Tensor:
    """The gated mix of the three branches: `[B, Tq, Hq, Dv]`.

    `gpu=False` runs every branch on the reference executor. `gpu=True` (the triton backend: CUDA, no
    varlen) runs the compressed branch (Tk // block_size pooled keys) and the window on compiled
    FlexAttention, the selection from the compressed branch's LSE, and the selected branch on the
    Triton sparse kernel (per-token rows, selection shared by the KV group).

    The options without any gate are valid for the selection alone (`policy`, the decode reader), not
    for attention."""
    if all(getattr(opts, name) is None for name in GATES):
        raise OptionError("g_cmp, g_slc, g_swa: expected at least one gate (a missing gate drops its branch), got none")
    cd = compute_dtype(call.dtype)
    out = torch.zeros(*call.q.shape[:3], call.v.shape[-1], dtype=cd, device=call.device)

    def add(gate: torch.Tensor, o: torch.Tensor) -> None:
        nonlocal out
        out = out + gate.to(cd).unsqueeze(-1) * o.to(cd)

    lse_cmp = None
    if opts.g_cmp is not None:
        o_cmp, lse_cmp, _ = compressed_branch(call, opts.block_size, flex=gpu)
        add(opts.g_cmp, o_cmp)
    if opts.g_slc is not None:
        sel = (policy(call, opts) if lse_cmp is None
               else selection_from_lse(call, opts.block_size, opts.topk, lse_cmp))
        if gpu:
            o_slc = run_triton(call, sel)
        else:
            o_slc, _ = blockwise_attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                                           cu_seqlens=call.cu_seqlens, selection=sel)
        add(opts.g_slc, o_slc)
    if opts.g_swa is not None:
        if gpu:
            o_swa = run_flex_mask(call, masks.sliding_window(opts.window))
        else:
            o_swa, _ = blockwise_attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                                           cu_seqlens=call.cu_seqlens, mask=masks.sliding_window(opts.window))
        add(opts.g_swa, o_swa)
    return out.to(call.dtype)


def select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, causal: bool = True,
           scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    """NSA's selected-branch selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]`: per KV group, the
    first, own and previous blocks plus the best blocks by compressed-attention probability, `topk` in all.

    Returns `KVSelection(indices int32 [B (N under varlen), Hkv, Tq, min(max(topk, 3), Nk)], 1, block_size)`."""
    return SPEC.selection(q, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens, block_size=block_size, topk=topk)


def _example(call: AttentionCall) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    gate = lambda: torch.sigmoid(torch.randn(call.batch, call.tq, call.hq, generator=g)).to(  # noqa: E731
        device=call.device, dtype=call.dtype)
    block = max(1, min(64, call.tk // 8))
    return {"block_size": block, "topk": 4, "window": max(1, min(512, call.tk // 4)),
            "g_cmp": gate(), "g_slc": gate(), "g_swa": gate()}


class NSAGates(nn.Module):
    detach_input = False

    """NSA's branch gates: `sigmoid(x W + b)` per query head and branch. The sliding branch
    (`g_swa`) exists when the method has a `window`."""

    query_names = ("g_cmp", "g_slc", "g_swa")
    key_names: tuple[str, ...] = ()

    def __init__(self, q_features: int, k_features: int, num_heads: int, options: dict[str, Any]) -> None:
        super().__init__()
        self.q_features, self.k_features, self.num_heads = q_features, k_features, num_heads
        self.branches = self.query_names if options.get("window") is not None else self.query_names[:2]
        self.proj = nn.Linear(q_features, len(self.branches) * num_heads)

    def query_inputs(self, xq: torch.Tensor) -> dict[str, torch.Tensor]:
        B, T, _ = xq.shape
        g = torch.sigmoid(self.proj(xq)).view(B, T, len(self.branches), self.num_heads)  # [B, T, n, Hq]
        return {name: g[:, :, i] for i, name in enumerate(self.branches)}

    def key_inputs(self, xk: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def aux_loss(self, q: torch.Tensor, k: torch.Tensor, made: dict[str, torch.Tensor], options: dict[str, Any],
                 cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None  # the gates train through the attention output


def _variants(call: AttentionCall, opts: NsaOptions) -> list[tuple[str, bool, str]]:
    """The fused selection kernel, the default where it can serve (`router.routed_kernel`)."""
    return [kernel_variant("routed_topk", call, config.get().routed_topk_devices,
                           "fused compressed-probability + top-k Triton kernel (PyTorch tiles past its maximum topk)")]


SPEC = register_selection(
    "nsa",
    NsaOptions,
    policy,
    paper="Native Sparse Attention; Optimizing NSA",
    summary="gated mix of compressed (mean-pooled blocks), selected (top-k blocks) and sliding-window branches",
    example=_example,
    capabilities=Capabilities(lse=False),
    inputs=NSAGates,
    variants=_variants,
    backends=(
        Backend("triton", lambda call, opts: run(call, opts, gpu=True), devices=("cuda",),
                dtypes=(torch.float16, torch.bfloat16, torch.float32), lse=False, varlen=False,
                supports=lambda call, opts: triton_why_not(call, None) or flex_why_not_mask(call, None)),
        Backend("reference", run, lse=False),
    ),
)
