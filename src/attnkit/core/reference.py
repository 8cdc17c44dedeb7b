"""Memory-efficient exact attention ("Self-attention Does Not Need O(n^2) Memory", Rabe & Staats).

The reference backend of every softmax executor. Queries are processed in chunks; for each chunk
an online softmax runs over key chunks, so memory is O(T) (one `[B, H, Cq, Ck]` tile at a time).
The backward pass is a custom autograd function that recomputes probabilities tile by tile from
the saved LSE instead of storing them, as FlashAttention does.

Visibility of a (query, key) pair is the AND of: causality (bottom-right aligned), the varlen
sequence boundary, a mask predicate (`core.masks`) and a `KVSelection`. Tiles that nothing can
see are skipped, so causal and sparse patterns also save compute. Accumulation is float32 for
half and single precision inputs, float64 for float64 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .contract import compute_dtype
from .masks import Mask
from .selection import KVSelection, cdiv

TILE_ELEMS = 1 << 21  # scores per tile (8 MiB in float32): bounds memory, amortises Python overhead


@dataclass
class _Geometry:
    """Positions and masking inputs shared by forward and backward."""

    causal: bool
    mask: Optional[Mask]
    selection: Optional[KVSelection]
    hq: int
    hkv: int
    # per-query / per-key: sequence id, position local to the sequence (query in key coords)
    q_seq: Optional[torch.Tensor]
    k_seq: Optional[torch.Tensor]
    q_pos: torch.Tensor  # aligned query position [Tq]
    q_row: torch.Tensor  # query index within its sequence in query coordinates [Tq] (selection rows)
    k_pos: torch.Tensor  # [Tk]
    num_k_blocks: int

    @property
    def group(self) -> int:
        return self.hq // self.hkv


def _geometry(tq: int, tk: int, hq: int, hkv: int, causal: bool, cu_seqlens: Optional[torch.Tensor],
              mask: Optional[Mask], selection: Optional[KVSelection], device: torch.device) -> _Geometry:
    if cu_seqlens is None:
        q_row = torch.arange(tq, device=device)
        q_pos = q_row + (tk - tq)
        k_pos = torch.arange(tk, device=device)
        q_seq = k_seq = None
        longest = tk
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=tq)
        q_row = torch.arange(tq, device=device) - cu[seq]
        q_pos, k_pos, q_seq, k_seq = q_row, q_row, seq, seq
        longest = int(lengths.max()) if lengths.numel() else 0
    nkb = cdiv(longest, selection.k_block) if selection is not None else 0
    return _Geometry(causal, mask, selection, hq, hkv, q_seq, k_seq, q_pos, q_row, k_pos, nkb)


class _QueryChunk:
    """Masking for one chunk of queries against any key chunk, shaped `[B, Hkv, G, Cq, Ck]`."""

    def __init__(self, g: _Geometry, qs: slice, batch: int, device: torch.device) -> None:
        self.g, self.qs = g, qs
        self.q_pos = g.q_pos[qs]
        self.q_seq = g.q_seq[qs] if g.q_seq is not None else None
        self.h = torch.arange(g.hq, device=device).view(1, g.hkv, g.group, 1, 1)
        self.b = (torch.arange(batch, device=device).view(-1, 1, 1, 1, 1) if self.q_seq is None
                  else self.q_seq.view(1, 1, 1, -1, 1))
        self.sel_vis = self._selection_visibility(batch, device) if g.selection is not None else None

    def _selection_visibility(self, batch: int, device: torch.device) -> torch.Tensor:
        """Key blocks visible to each query of the chunk: `[Bsel, Hkv|1, G|1, Cq, Nk + 1]` (last = padding)."""
        sel, g = self.g.selection, self.g
        idx = sel.indices.to(device=device, dtype=torch.int64)
        rows = g.q_row[self.qs] // sel.q_block
        if self.q_seq is None:
            r = idx[:, :, rows, :]  # [B, Hsel, Cq, S]
        else:
            r = idx[self.q_seq, :, rows, :].permute(1, 0, 2).unsqueeze(0)  # [1, Hsel, Cq, S]
        r = torch.where(r < 0, g.num_k_blocks, r)
        vis = torch.zeros(*r.shape[:3], g.num_k_blocks + 1, dtype=torch.bool, device=device)
        vis.scatter_(-1, r, True)
        hs = vis.shape[1]
        if hs == g.hq:
            return vis.view(vis.shape[0], g.hkv, g.group, *vis.shape[2:])
        if hs == g.hkv:
            return vis.unsqueeze(2)
        return vis.unsqueeze(1)

    def tile(self, ks: slice) -> Union[None, bool, torch.Tensor]:
        """None: all visible; False: nothing visible (skip the tile); else a bool mask."""
        g = self.g
        k_pos = g.k_pos[ks]
        if g.causal and g.q_seq is None and int(k_pos[0]) > int(self.q_pos[-1]):
            return False
        if self.q_seq is not None:
            k_seq = g.k_seq[ks]
            if int(k_seq[0]) > int(self.q_seq[-1]) or int(k_seq[-1]) < int(self.q_seq[0]):
                return False
        m: Optional[torch.Tensor] = None

        def _and(x: torch.Tensor) -> None:
            nonlocal m
            m = x if m is None else (m & x)

        qp, kp = self.q_pos.view(-1, 1), k_pos.view(1, -1)
        if self.q_seq is not None:
            _and(self.q_seq.view(-1, 1) == g.k_seq[ks].view(1, -1))
        if g.causal:
            _and(kp <= qp)
        if g.mask is not None:
            _and(g.mask(self.b, self.h, qp, kp))
        if self.sel_vis is not None:
            kb = (k_pos // g.selection.k_block).clamp_max(g.num_k_blocks)
            _and(self.sel_vis[..., kb])
        if m is None:
            return None
        if not bool(m.any()):
            return False
        return None if bool(m.all()) else m


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _tile_sizes(batch: int, hq: int, tq: int, tk: int, q_chunk: Optional[int], k_chunk: Optional[int]) -> tuple[int, int]:
    ck = k_chunk or min(tk, 512)
    cq = q_chunk or max(1, min(tq, TILE_ELEMS // max(1, batch * hq * ck)))
    return cq, ck


def _weighted_values(p: torch.Tensor, vc: torch.Tensor, vis: Optional[torch.Tensor]) -> torch.Tensor:
    """`p @ vc` where a non-finite value reaches only the rows that see its key (also `dS @ K`).

    `p: [.., Cq, Ck]` is 0 on hidden keys, and `0 * inf = NaN` would leak a hidden inf or NaN into
    every row of the tile. Non-finite values are replaced by 0 in the product; the rows that see
    one (`vis`, None = all) are set to NaN, as the plain product would make them."""
    bad = ~torch.isfinite(vc)  # [B, Hkv, 1, Ck, Dv]
    if not bool(bad.any()):
        return torch.matmul(p, vc)
    out = torch.matmul(p, vc.masked_fill(bad, 0.0))
    seen = torch.ones_like(p) if vis is None else vis.to(p.dtype).expand_as(p)
    reached = torch.matmul(seen, bad.to(p.dtype)) > 0  # [.., Cq, Dv]: a visible key has a non-finite value
    return out.masked_fill(reached, float("nan"))


def _forward(q, k, v, scale: float, g: _Geometry, cq: int, ck: int):
    """q: [B, Hkv, G, Tq, D], k: [B, Hkv, 1, Tk, D], v: [B, Hkv, 1, Tk, Dv] -> out (compute dtype), lse."""
    B, Hkv, G, Tq, _ = q.shape
    Tk, Dv = k.shape[3], v.shape[4]
    cd = compute_dtype(q.dtype)
    out = torch.empty(B, Hkv, G, Tq, Dv, dtype=cd, device=q.device)
    lse = torch.empty(B, Hkv, G, Tq, dtype=cd, device=q.device)
    kchunks = _chunks(Tk, ck)
    for qs in _chunks(Tq, cq):
        qc = q[..., qs, :].to(cd)
        chunk = _QueryChunk(g, qs, B, q.device)
        n = qs.stop - qs.start
        m = torch.full((B, Hkv, G, n), float("-inf"), dtype=cd, device=q.device)
        l = torch.zeros(B, Hkv, G, n, dtype=cd, device=q.device)
        acc = torch.zeros(B, Hkv, G, n, Dv, dtype=cd, device=q.device)
        for ks in kchunks:
            vis = chunk.tile(ks)
            if vis is False:
                continue
            s = torch.matmul(qc, k[..., ks, :].to(cd).transpose(-1, -2)).mul_(scale)
            if vis is not None:
                s.masked_fill_(~vis, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s.sub_(m_safe.unsqueeze(-1)))
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + _weighted_values(p, v[..., ks, :].to(cd), vis)
            m = m_new
        empty = l == 0
        out[..., qs, :] = torch.where(empty.unsqueeze(-1), torch.zeros_like(acc), acc / torch.where(empty, 1, l).unsqueeze(-1))
        lse[..., qs] = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(torch.where(empty, 1, l)))
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, scale: float, g: _Geometry, cq: int, ck: int):
    """Recomputing backward; shapes as `_forward`, `dout` like `out`, `dlse` like `lse` (or None).

    With P the probabilities, dS = P * (dP - rowsum(dO * O) + dLSE), since dLSE/dS = P.
    Returns dq, dk, dv in the compute dtype."""
    B, Hkv, G, Tq, _ = q.shape
    Tk = k.shape[3]
    cd = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    kchunks = _chunks(Tk, ck)
    for qs in _chunks(Tq, cq):
        qc = q[..., qs, :].to(cd)
        doc = dout[..., qs, :].to(cd)
        delta = (doc * out[..., qs, :].to(cd)).sum(-1, keepdim=True)  # [B, Hkv, G, Cq, 1]
        if dlse is not None:
            delta = delta - dlse[..., qs].to(cd).unsqueeze(-1)
        lse_c = lse[..., qs]
        lse_safe = torch.where(torch.isinf(lse_c), torch.full_like(lse_c, float("inf")), lse_c).unsqueeze(-1)
        chunk = _QueryChunk(g, qs, B, q.device)
        dq_c = torch.zeros_like(qc)
        for ks in kchunks:
            vis = chunk.tile(ks)
            if vis is False:
                continue
            kc, vc = k[..., ks, :].to(cd), v[..., ks, :].to(cd)
            s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale)
            if vis is not None:
                s.masked_fill_(~vis, float("-inf"))
            p = torch.exp(s.sub_(lse_safe))  # [B, Hkv, G, Cq, Ck]
            dv[..., ks, :] += torch.matmul(p.transpose(-1, -2), doc).sum(2, keepdim=True)
            dp = torch.matmul(doc, vc.transpose(-1, -2)).sub_(delta)
            if vis is not None:  # a hidden non-finite value must not reach dS through p = 0
                dp = dp.masked_fill_(~vis, 0.0)
            ds = p.mul_(dp)
            dq_c += _weighted_values(ds, kc, vis)  # ds is 0 on hidden keys, which may be non-finite
            dk[..., ks, :] += torch.matmul(ds.transpose(-1, -2), qc).sum(2, keepdim=True)
        dq[..., qs, :] = dq_c * scale
    return dq, dk * scale, dv


def _to_grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, Hkv, H // Hkv, T, D] (a view when possible)."""
    B, T, H, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, hkv, H // hkv, T, D)


def _from_grouped(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, T, D] -> [B, T, Hkv * G, D]."""
    B, Hkv, G, T, D = x.shape
    return x.reshape(B, Hkv * G, T, D).permute(0, 2, 1, 3)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, geometry, cq, ck):
        hkv = k.shape[2]
        qg, kg, vg = _to_grouped(q, hkv), _to_grouped(k, hkv), _to_grouped(v, hkv)
        out, lse = _forward(qg, kg, vg, scale, geometry, cq, ck)
        out_t = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out_t, lse)
        ctx.args = (scale, geometry, cq, ck)
        lse_out = lse.reshape(q.shape[0], q.shape[2], q.shape[1])
        return _from_grouped(out_t), lse_out.to(torch.float64 if q.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out_t, lse = ctx.saved_tensors
        scale, geometry, cq, ck = ctx.args
        hkv = k.shape[2]
        if dlse is not None:
            dlse = dlse.reshape(lse.shape).masked_fill(torch.isinf(lse), 0)
        dq, dk, dv = _backward(_to_grouped(q, hkv), _to_grouped(k, hkv), _to_grouped(v, hkv), out_t, lse,
                               _to_grouped(dout, hkv), dlse, scale, geometry, cq, ck)
        return (_from_grouped(dq).to(q.dtype), _from_grouped(dk).to(k.dtype), _from_grouped(dv).to(v.dtype),
                None, None, None, None)


def blockwise_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    mask: Optional[Mask] = None,
    selection: Optional[KVSelection] = None,
    q_chunk: Optional[int] = None,
    k_chunk: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in O(T) memory: `(out [B, Tq, Hq, Dv], lse [B, Hq, Tq])`.

    Inputs are assumed validated (`core.contract.validate_attention`; `selection.validate`).
    The LSE is float32 (float64 for float64 inputs) and `-inf` for a query that sees no key, whose
    output row is 0. Differentiable in q, k, v through both outputs (backward recomputes tile by
    tile), so partial results can be merged by their LSE (ring attention, NSA branches).
    """
    B, Tq, Hq, _ = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    geometry = _geometry(Tq, Tk, Hq, Hkv, causal, cu_seqlens, mask, selection, q.device)
    cq, ck = _tile_sizes(B, Hq, Tq, Tk, q_chunk, k_chunk)
    return _BlockwiseAttention.apply(q, k, v, scale, geometry, cq, ck)
