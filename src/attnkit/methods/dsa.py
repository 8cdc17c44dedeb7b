"""`dsa`: DeepSeek Sparse Attention (DeepSeek-V3.2; via MISA and StreamIndex).

A lightning indexer scores every causal key for every query,
    `I[i, j] = sum_h w[i, h] * relu(q_idx[i, h] . k_idx[j])`,
with `q_idx [B, Tq, Hi, Di]`, one `k_idx [B, Tk, Di]` shared by the indexer heads and
`w [B, Tq, Hi]`; each query attends to its `topk` causal keys by `I`, shared by all attention
heads. Top-k is streaming (`core.topk`): scores are made tile by tile and never form `[Tq, Tk]`;
or, with `config` `dsa_fused_topk_devices`, the indexer and its top-k run fused on chip
(`kernels/selection/indexer_topk.py`) and the scores are never written.

`indexer_loss` is how DeepSeek trains the indexer: the KL divergence from the main attention's
distribution over the selected keys (summed over heads, L1-normalised) to the indexer's softmax
over the same keys. The target is detached; gradients reach `q_idx`, `k_idx` and `w` only.

Selection: `KVSelection(indices [B, 1, Tq, min(topk, Tk)], q_block=1, k_block=1)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from .. import config
from ..core.checks import check_int, check_tensor_shape, check_tensor_type
from ..core.contract import AttentionCall, AttnkitError, OptionError, validate_attention
from ..core.selection import KVSelection
from ..core.topk import grown_rows, streaming_topk, tile_budget, tile_sizes
from ..ops.sparse import validate_selection
from ..registry import MethodOptions, register_selection
from .gemm import bmm_f32, compute_dtype, half_gemm
from .router import SeqView, compact_rows, kernel_variant, radix_kernel, seq_view


@dataclass(frozen=True)
class DsaOptions(MethodOptions):
    topk: int
    q_idx: torch.Tensor  # [B, Tq, Hi, Di]
    k_idx: torch.Tensor  # [B, Tk, Di]
    w: torch.Tensor  # [B, Tq, Hi]

    def __post_init__(self) -> None:
        check_int("topk", self.topk, 1)
        for name in ("q_idx", "k_idx", "w"):
            check_tensor_type(name, getattr(self, name))

    def check_call(self, call: AttentionCall) -> None:
        if self.q_idx.dim() != 4:
            raise OptionError(f"q_idx: expected 4 dims [B, Tq, Hi, Di], got shape {tuple(self.q_idx.shape)}")
        hi, di = self.q_idx.shape[2], self.q_idx.shape[3]
        if hi < 1 or di < 1:
            raise OptionError(f"q_idx: expected Hi >= 1 and Di >= 1, got shape {tuple(self.q_idx.shape)}")
        check_tensor_shape("q_idx", self.q_idx, (call.batch, call.tq, hi, di), "[B, Tq, Hi, Di]", call)
        check_tensor_shape("k_idx", self.k_idx, (call.batch, call.tk, di), "[B, Tk, Di]", call)
        check_tensor_shape("w", self.w, (call.batch, call.tq, hi), "[B, Tq, Hi]", call)


MAX_KERNEL_INDEX_DIM = 256


def _indexer_kernel(device: torch.device, index_dim: int, dtype: torch.dtype) -> Any:
    """The fused indexer-score kernel module when it can serve this device, else None (PyTorch tiles)."""
    from .. import kernels

    if index_dim > MAX_KERNEL_INDEX_DIM or dtype == torch.float64:
        return None
    return kernels.module_for("selection.indexer", device, config.get().dsa_indexer_devices)


def _fused_topk_kernel(call: AttentionCall, opts: "DsaOptions") -> Any:
    """The module of the indexer fused with its top-k (`kernels/selection/indexer_topk.py`) when it
    can serve this call, else None (the tile-by-tile paths below)."""
    from .. import kernels

    if call.dtype == torch.float64 or opts.q_idx.shape[-1] > MAX_KERNEL_INDEX_DIM:
        return None
    mod = kernels.module_for("selection.indexer_topk", call.device, config.get().dsa_fused_topk_devices)
    return mod if mod is not None and mod.supports(opts.topk, call.tk) else None


def _variants(call: AttentionCall, opts: Any) -> list[tuple[str, bool, str]]:
    """The fused kernels as named variants of DSA's selection (what `_fused_topk_kernel` and
    `_indexer_kernel` decide)."""
    from .. import kernels

    fused = _fused_variant(call, opts)
    devices = config.get().dsa_indexer_devices
    if call.dtype == torch.float64:
        return [fused, ("indexer_kernel", False, "no float64")]
    if opts.q_idx.shape[-1] > MAX_KERNEL_INDEX_DIM:
        return [fused, ("indexer_kernel", False, f"index dim {opts.q_idx.shape[-1]} > {MAX_KERNEL_INDEX_DIM}")]
    if call.device.type not in devices:
        where = "/".join(devices) or "no device"
        return [fused, ("indexer_kernel", False, f"runs on {where}, inputs are on {call.device.type}")]
    reason = kernels.device_ok(call.device.type)
    return [fused, ("indexer_kernel", reason is None, reason or "fused indexer-score Triton kernel"),
            _radix_variant(call)]


def _fused_variant(call: AttentionCall, opts: Any) -> tuple[str, bool, str]:
    """The indexer fused with its top-k (off by default until measured on a GPU)."""
    name = "fused_topk"
    if opts.q_idx.shape[-1] > MAX_KERNEL_INDEX_DIM:
        return (name, False, f"index dim {opts.q_idx.shape[-1]} > {MAX_KERNEL_INDEX_DIM}")
    row = kernel_variant(name, call, config.get().dsa_fused_topk_devices,
                         "indexer scores and top-k fused on chip (the scores are never written)")
    if row[1] and _fused_topk_kernel(call, opts) is None:
        return (name, False, f"topk {opts.topk} of {call.tk} keys needs more candidates per row than the kernel keeps")
    return row


def _radix_variant(call: AttentionCall) -> tuple[str, bool, str]:
    """The radix select in place of `torch.topk` (off by default: measured slower, docs/executors.md)."""
    if compute_dtype(call.dtype) != torch.float32:
        return ("radix_topk", False, "no float64")
    return kernel_variant("radix_topk", call, config.get().radix_topk_devices,
                          "radix select over whole-row score tiles instead of torch.topk")


class _Indexer:
    """Lightning-indexer scores of a view, tile by tile: `I [N, R, C]` in the compute dtype."""

    def __init__(self, view: SeqView, q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor) -> None:
        cd = compute_dtype(view.q.dtype)
        # half-precision CUDA indexer inputs stay half: `bmm_f32` multiplies them exactly into float32
        half_ok = half_gemm(q_idx.device, q_idx.dtype) and k_idx.dtype == q_idx.dtype
        md = q_idx.dtype if half_ok else cd
        self.view = view
        self.kernel = _indexer_kernel(view.q.device, q_idx.shape[-1], md)
        self.q_idx = view.pad(q_idx.detach()).to(md)  # [N, Tq, Hi, Di]
        k = view.pad(k_idx.detach()).to(md)
        self.k = k.contiguous() if self.kernel is not None else None  # [N, Tk, Di] (the kernel's layout)
        self.k_t = k.transpose(1, 2).contiguous() if self.kernel is None else None  # [N, Di, Tk]
        self.w = view.pad(w.detach()).to(cd).unsqueeze(2)  # [N, Tq, 1, Hi]
        self.q_pos = view.q_pos()
        self.hi = self.q_idx.shape[2]
        # keys past the shortest sequence need the length mask (varlen only: a host sync, once per call)
        self.shortest = view.tk if view.packing is None else int(view.k_len.min())

    def __call__(self, rows: slice, cols: slice) -> torch.Tensor:
        if self.kernel is not None:  # fused: one write of the tile, masks included
            return self.kernel.indexer_scores(self.q_idx, self.k, self.w.squeeze(2), self.view.k_len, rows, cols,
                                              self.view.offset, self.view.causal)
        N, R = self.q_idx.shape[0], rows.stop - rows.start
        qi = self.q_idx[:, rows].reshape(N, R * self.hi, -1)  # [N, R*Hi, Di]
        s = bmm_f32(qi, self.k_t[:, :, cols]).relu_()  # [N, R*Hi, C] float32
        C = s.shape[-1]
        s = torch.bmm(self.w[:, rows].reshape(N * R, 1, self.hi), s.view(N * R, self.hi, C)).view(N, R, C)
        # only tiles crossing the diagonal (or a sequence end) need a mask
        crosses_diagonal = self.view.causal and cols.stop - 1 > rows.start + self.view.offset
        if crosses_diagonal or cols.stop > self.shortest:
            j = torch.arange(cols.start, cols.stop, device=s.device).view(1, 1, -1)
            visible = j < self.view.k_len.view(-1, 1, 1)
            if self.view.causal:
                visible = visible & (j <= self.q_pos[rows].view(1, -1, 1))
            s = s.masked_fill_(~visible, float("-inf"))
        return s


def policy(call: AttentionCall, opts: DsaOptions) -> KVSelection:
    """The DSA selection of a validated call (no gradients)."""
    view = seq_view(call)
    fused = _fused_topk_kernel(call, opts)
    if fused is not None:
        with torch.no_grad():
            return KVSelection(_fused_rows(view, opts, fused).unsqueeze(1), q_block=1, k_block=1)
    with torch.no_grad():
        indexer = _Indexer(view, opts.q_idx, opts.k_idx, opts.w)
        N, Tq, Tk = view.q.shape[0], view.tq, view.tk
        dev = view.q.device
        # memory per score: the tile and top-k's workspace; the PyTorch tiles also hold Hi GEMM outputs
        per_pair = N * (2 if indexer.kernel is not None else indexer.hi + 2)
        row_chunk, col_chunk = tile_sizes(Tq, Tk, elems_per_pair=per_pair, device=dev)

        def col_stop(rows: slice) -> int:
            return rows.stop + view.offset if view.causal else Tk

        radix = radix_kernel(dev, compute_dtype(call.dtype))
        if radix is not None:
            idx = _radix_rows(view, indexer, radix, opts.topk, col_stop, tile_budget(dev) // per_pair)
            return KVSelection(idx.unsqueeze(1), q_block=1, k_block=1)
        _, idx = streaming_topk(indexer, (N,), Tq, Tk, opts.topk, row_chunk=row_chunk, col_chunk=col_chunk,
                                col_stop=col_stop, dtype=compute_dtype(call.dtype), device=dev,
                                max_tile_elems=tile_budget(dev) // per_pair, ordered=False)
    return KVSelection(compact_rows(idx.unsqueeze(1), opts.topk), q_block=1, k_block=1)


def _fused_rows(view: SeqView, opts: DsaOptions, fused: Any) -> torch.Tensor:
    """Each query's `topk` keys by the indexer fused with its top-k: int32 `[N, Tq, min(topk, Tk)]`,
    ascending, -1 padded, ties by index. A launch holds as many rows as four `tile_budget`s allow for
    the kernel's candidate buffer (all 64K rows of a 2048 selection: one launch balances the causal
    rows' unequal work best)."""
    cd = compute_dtype(view.q.dtype)
    q_idx, k_idx = opts.q_idx.detach(), opts.k_idx.detach()
    md = q_idx.dtype if half_gemm(q_idx.device, q_idx.dtype) and k_idx.dtype == q_idx.dtype else cd
    q_idx, k_idx = view.pad(q_idx).to(md), view.pad(k_idx).to(md)
    w = view.pad(opts.w.detach()).to(cd)
    per_row = 2 * q_idx.shape[0] * fused.buffer_width(opts.topk, view.tk)
    return fused.indexer_topk(q_idx, k_idx, w, view.k_len, view.offset, view.causal, opts.topk,
                              max_rows=max(1, 4 * tile_budget(view.q.device) // per_row))


def _radix_rows(view: SeqView, indexer: "_Indexer", radix: Any, topk: int, col_stop: Any, max_tile: int) -> torch.Tensor:
    """Each query's `topk` keys by a radix select over whole-row score tiles (`kernels/selection/
    radix_topk.py`): int32 `[N, Tq, min(topk, Tk)]`, ascending, -1 padded. A tile holds as many rows
    as `max_tile` scores allow (more for the short rows of a causal call)."""
    N, Tq, Tk = view.q.shape[0], view.tq, view.tk
    width = min(topk, Tk)
    out = torch.full((N, Tq, width), -1, dtype=torch.int32, device=view.q.device)
    q_pos = view.q_pos()
    r0 = 0
    while r0 < Tq:
        rows = slice(r0, r0 + grown_rows(r0, max(1, min(Tq - r0, max_tile // max(1, Tk))), Tq, Tk, Tk, col_stop,
                                          max_tile))
        r0 = rows.stop
        stop = max(0, min(Tk, int(col_stop(rows))))
        if stop == 0:
            continue
        s = indexer(rows, slice(0, stop))  # [N, R, stop]
        R = s.shape[1]
        visible = view.k_len.view(N, 1).expand(N, R)
        if view.causal:
            visible = torch.minimum(visible, (q_pos[rows] + 1).clamp_min(0).view(1, R))
        idx = radix.radix_topk(s.reshape(N * R, stop), visible.reshape(-1), topk)
        out[:, rows, : idx.shape[-1]] = idx.view(N, R, -1)
    return out


def select(q: torch.Tensor, k: torch.Tensor, *, topk: int, q_idx: torch.Tensor, k_idx: torch.Tensor, w: torch.Tensor,
           causal: bool = True, cu_seqlens: Optional[torch.Tensor] = None) -> KVSelection:
    """DSA's selection: per query, the `topk` causal keys by the lightning-indexer score, shared by
    all heads. `q`, `k` give the shapes and layout; the scores come from `q_idx`, `k_idx`, `w`.

    Returns `KVSelection(indices int32 [B (N under varlen), 1, Tq, min(topk, Tk)], 1, 1)`."""
    return SPEC.selection(q, k, causal=causal, cu_seqlens=cu_seqlens, topk=topk, q_idx=q_idx, k_idx=k_idx, w=w)


def indexer_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    w: torch.Tensor,
    *,
    topk: Optional[int] = None,
    selection: Optional[KVSelection] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """DeepSeek's indexer training loss: `sum_i KL(p_i || softmax(I[i, S_i]))` over queries i.

    `S_i` is the query's selected key set (`selection`, or `select(..., topk=topk)` when None),
    restricted to causal keys. The target `p_i` is the main attention's probability over `S_i`
    (softmax of `q . k * scale` over `S_i` per head), summed over the `Hq` heads and L1-normalised,
    and is detached: the loss trains the indexer (`q_idx`, `k_idx`, `w`), not `q`, `k`.
    `reduction`: "sum" over queries (the paper's), or "mean" over queries that see a key.
    Memory is O(T * |S|): keys are gathered per selected index, never `[Tq, Tk]`.
    """
    call = validate_attention(q, k, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    if reduction not in ("sum", "mean"):
        raise AttnkitError(f"reduction: expected 'sum' or 'mean', got {reduction!r}")
    if selection is None and topk is None:
        raise AttnkitError("topk: required when no selection is given (or pass selection=)")
    opts = DsaOptions(1 if topk is None else topk, q_idx, k_idx, w)
    opts.check_call(call)
    if selection is None:
        selection = policy(call, opts)
    validate_selection(call, selection)
    if selection.q_block != 1 or selection.k_block != 1 or selection.num_heads != 1:
        raise AttnkitError(
            f"selection: expected a token-level selection shared by all heads (q_block=1, k_block=1, Hsel=1), got "
            f"q_block={selection.q_block}, k_block={selection.k_block}, Hsel={selection.num_heads}"
        )
    view = seq_view(call)
    cd = compute_dtype(call.dtype)
    qi, ki, wi = view.pad(q_idx).to(cd), view.pad(k_idx).to(cd), view.pad(w).to(cd)  # differentiable
    N, Tq, Hq, D = view.q.shape
    Hkv, S = view.k.shape[2], selection.width
    idx = selection.indices.to(torch.int64)[:, 0]  # [N, Tq, S]
    q_pos = view.q_pos().view(1, -1, 1)
    valid = (idx >= 0) & (idx < view.k_len.view(-1, 1, 1))
    if call.causal:
        valid = valid & (idx <= q_pos)
    if view.packing is not None:
        valid = valid & view.packing.valid.unsqueeze(-1)
    safe = idx.clamp_min(0)
    batch = torch.arange(N, device=idx.device).view(-1, 1, 1)
    total = torch.zeros((), dtype=cd, device=idx.device)
    row_chunk = max(1, (1 << 22) // max(1, N * S * (Hkv * D + Hq + qi.shape[2] + ki.shape[-1])))
    for r0 in range(0, Tq, row_chunk):
        rows = slice(r0, min(r0 + row_chunk, Tq))
        sel, ok = safe[:, rows], valid[:, rows]  # [N, R, S]
        b = batch.expand_as(sel)
        with torch.no_grad():  # target: main attention over the selected keys, mean over heads
            kg = view.k[b, sel].to(cd)  # [N, R, S, Hkv, D]
            qc = view.q[:, rows].to(cd).view(N, -1, Hkv, Hq // Hkv, D)
            logits = torch.einsum("nrkgd,nrskd->nrkgs", qc, kg) * call.scale
            logits = logits.masked_fill(~ok.view(N, -1, 1, 1, S), float("-inf"))
            p = torch.softmax(logits, -1).nan_to_num(0.0).mean(dim=(2, 3))  # [N, R, S]
        rel = torch.einsum("nrhd,nrsd->nrhs", qi[:, rows], ki[b, sel]).relu()  # [N, R, Hi, S]
        score = torch.einsum("nrh,nrhs->nrs", wi[:, rows], rel).masked_fill(~ok, float("-inf"))
        score = score.masked_fill(~ok.any(-1, keepdim=True), 0.0)  # rows without a key: no NaN
        log_q = torch.log_softmax(score, -1)
        kl = torch.xlogy(p, p) - p * torch.where(ok, log_q, torch.zeros_like(log_q))
        total = total + kl.sum()
    if reduction == "mean":
        counted = valid.any(-1).sum().clamp_min(1)
        total = total / counted.to(cd)
    return total


def _example(call: AttentionCall) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(0)
    hi, di = 4, 16
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=call.device, dtype=call.dtype)  # noqa: E731
    return {
        "topk": max(1, min(2048, call.tk // 8)),
        "q_idx": mk(call.batch, call.tq, hi, di),
        "k_idx": mk(call.batch, call.tk, di),
        "w": mk(call.batch, call.tq, hi).abs() * hi ** -0.5,
    }


class DSAIndexer(nn.Module):
    """DSA's lightning indexer inputs: `q_idx = x Wq`, `w = x Ww * Hi^-1/2`, `k_idx = x Wk`.

    `heads` (Hi) and `dim` (Di) size the indexer (DeepSeek-V3.2 uses 64 x 128; tiny defaults
    here). Keys go through a LayerNorm as in the paper. As in the paper the indexer reads a
    detached input (`detach_input`): it trains only through `aux_loss`."""

    detach_input = True

    query_names = ("q_idx", "w")
    key_names = ("k_idx",)

    def __init__(self, q_features: int, k_features: int, num_heads: int, options: dict[str, Any],
                 heads: int = 4, dim: int = 32) -> None:
        super().__init__()
        for name, val in (("heads", heads), ("dim", dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise OptionError(f"inputs.{name}: expected an int >= 1, got {val!r}")
        self.q_features, self.k_features = q_features, k_features
        self.heads, self.dim = heads, dim
        self.wq = nn.Linear(q_features, heads * dim, bias=False)
        self.ww = nn.Linear(q_features, heads, bias=False)
        self.wk = nn.Linear(k_features, dim, bias=False)
        self.k_norm = nn.LayerNorm(dim)

    def query_inputs(self, xq: torch.Tensor) -> dict[str, torch.Tensor]:
        B, T, _ = xq.shape
        return {"q_idx": self.wq(xq).view(B, T, self.heads, self.dim), "w": self.ww(xq) * self.heads ** -0.5}

    def key_inputs(self, xk: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"k_idx": self.k_norm(self.wk(xk))}

    def aux_loss(self, q: torch.Tensor, k: torch.Tensor, made: dict[str, torch.Tensor], options: dict[str, Any],
                 cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """DeepSeek's indexer loss (KL from the main attention over the selected keys to the
        indexer's distribution), mean over queries. Top-k selection passes no gradient, so this
        is what trains the indexer; `q`, `k` are only the (detached) target."""
        return indexer_loss(q.detach(), k.detach(), made["q_idx"], made["k_idx"], made["w"], topk=options["topk"],
                            cu_seqlens=cu_seqlens, reduction="mean")


SPEC = register_selection("dsa", DsaOptions, policy, family="sparse", example=_example, inputs=DSAIndexer,
                          variants=_variants,
                          paper="DeepSeek Sparse Attention (DeepSeek-V3.2); MISA; StreamIndex",
                          summary="top-k causal keys per query by a lightning indexer, shared by all heads; "
                                  "streaming top-k")
