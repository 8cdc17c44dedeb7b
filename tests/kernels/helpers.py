"""Shared pieces of the kernel tests: random selections, a same-dtype baseline and the check.

The tolerance rule is DESIGN.md section 7: the fast path's error against the float64 reference
executor must be at most 2x the error of a plain PyTorch computation in the input dtype. The
baseline here is a naive softmax attention in the input dtype, computed over chunks of queries
(so no `Tq x Tk` tensor exists even at real sizes), with gradients taken chunk by chunk.
"""

from __future__ import annotations

from typing import Optional

import torch

import attnkit as ak
from attnkit.core.selection import KVSelection, cdiv
from tests.conftest import assert_close_rule


def random_selection(n: int, hsel: int, tq: int, tk: int, q_block: int, k_block: int, width: int,
                     device: str, empty_frac: float = 0.15, drop_frac: float = 0.25,
                     generator: Optional[torch.Generator] = None) -> KVSelection:
    """Duplicate-free random rows of `width` block ids, some entries -1, some rows all -1."""
    nq, nk = cdiv(tq, q_block), cdiv(tk, k_block)
    g = generator
    scores = torch.rand(n, hsel, nq, nk, generator=g)
    top = scores.topk(min(width, nk), dim=-1).indices
    if width > nk:
        top = torch.cat([top, torch.full((n, hsel, nq, width - nk), -1, dtype=top.dtype)], dim=-1)
    drop = torch.rand(top.shape, generator=g) < drop_frac
    empty = torch.rand(n, hsel, nq, 1, generator=g) < empty_frac
    idx = torch.where(drop | empty, torch.full_like(top, -1), top)
    return KVSelection(idx.to(torch.int32).to(device), q_block, k_block)


def _visible_chunk(sel: KVSelection, hq: int, hkv: int, rows: torch.Tensor, q_pos: torch.Tensor, tk: int,
                   causal: bool, mask=None) -> torch.Tensor:
    """[N, Hq, C, Tk] visibility of the chunk's queries (rows: query index in its sequence)."""
    idx = sel.indices.long()[:, sel.head_map(hq, hkv).to(sel.indices.device)]  # [N, Hq, Nq, S]
    nk = cdiv(tk, sel.k_block)
    r = idx[:, :, rows // sel.q_block]  # [N, Hq, C, S]
    r = torch.where((r < 0) | (r >= nk), nk, r)  # varlen: blocks past this sequence's end hold no key
    blocks = torch.zeros(*r.shape[:3], nk + 1, dtype=torch.bool, device=r.device)
    blocks.scatter_(-1, r, True)
    kpos = torch.arange(tk, device=r.device)
    vis = blocks[..., kpos // sel.k_block]
    if causal:
        vis = vis & (kpos.view(1, 1, 1, -1) <= q_pos.view(1, 1, -1, 1))
    if mask is not None:
        b = torch.arange(vis.shape[0], device=vis.device).view(-1, 1, 1, 1)
        h = torch.arange(hq, device=vis.device).view(1, -1, 1, 1)
        vis = vis & mask(b, h, q_pos.view(1, 1, -1, 1), kpos.view(1, 1, 1, -1))
    return vis


def baseline(q, k, v, sel, *, causal, scale, do, dlse, cu_seqlens=None, chunk=128, mask=None):
    """Naive attention in the inputs' dtype by query chunks: `(out, lse, dq, dk, dv)`."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        parts = []
        for n in range(len(cu) - 1):
            a, b = cu[n], cu[n + 1]
            if b == a:
                continue
            s_n = KVSelection(sel.indices[n : n + 1], sel.q_block, sel.k_block)
            parts.append(baseline(q[:, a:b], k[:, a:b], v[:, a:b], s_n, causal=causal, scale=scale,
                                  do=do[:, a:b], dlse=dlse[:, :, a:b], chunk=chunk))
        cat = lambda i, d: torch.cat([p[i] for p in parts], d)  # noqa: E731
        return cat(0, 1), cat(1, 2), cat(2, 1), cat(3, 1), cat(4, 1)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    outs, lses = [], []
    for a in range(0, Tq, chunk):
        b = min(a + chunk, Tq)
        rows = torch.arange(a, b, device=q.device)
        vis = _visible_chunk(sel, Hq, Hkv, rows, rows + (Tk - Tq), Tk, causal, mask)
        qc = q[:, a:b].transpose(1, 2)  # [B, Hq, C, D]
        kk = k.transpose(1, 2).repeat_interleave(G, 1)
        vv = v.transpose(1, 2).repeat_interleave(G, 1)
        s = torch.matmul(qc, kk.transpose(-1, -2)) * scale
        s = s.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
        o = torch.matmul(p, vv).transpose(1, 2)  # [B, C, Hq, Dv]
        loss = (o * do[:, a:b]).sum() + (torch.where(torch.isinf(lse), 0, lse) * dlse[:, :, a:b]).sum()
        loss.backward()
        outs.append(o.detach())
        lses.append(lse.detach())
    return torch.cat(outs, 1), torch.cat(lses, 2), q.grad, k.grad, v.grad


def run_backend(q, k, v, sel, backend, *, causal, scale, do, dlse, cu_seqlens=None, mask=None):
    """`ops.sparse_attention` (or `ops.masked_attention` when `sel` is None) with gradients."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    if sel is None:
        out, lse = ak.ops.masked_attention(q, k, v, mask, causal=causal, scale=scale, cu_seqlens=cu_seqlens,
                                           return_lse=True, backend=backend)
    else:
        out, lse = ak.ops.sparse_attention(q, k, v, sel, causal=causal, scale=scale, cu_seqlens=cu_seqlens,
                                           mask=mask, return_lse=True, backend=backend)
    loss = (out.float() * do.float()).sum() + (torch.where(torch.isinf(lse), 0, lse) * dlse.float()).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


def check_sparse(*, B=1, Tq, Tk, Hq, Hkv, Hsel, D, Dv=None, q_block, k_block, width, causal=True,
                 dtype=torch.bfloat16, device="cpu", cu_seqlens=None, backend="triton", seed=0,
                 empty_frac=0.15, backward=True, chunk=128, mask=None, masked_op=False):
    """Run `backend` on a random selection and check out, lse, dq, dk, dv by the 2x rule.
    `masked_op=True` checks `ops.masked_attention(mask)` instead (the selection is then all keys)."""
    Dv = Dv or D
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Tk, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(B, Tk, Hkv, Dv, generator=g).to(device, dtype)
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        sel = random_selection(len(cu) - 1, Hsel, longest, longest, q_block, k_block, width, device,
                               empty_frac=empty_frac, generator=g)
        cu_seqlens = cu_seqlens.to(device)
    else:
        sel = random_selection(B, Hsel, Tq, Tk, q_block, k_block, width, device, empty_frac=empty_frac,
                               generator=g)
    if masked_op:
        sel = KVSelection(torch.zeros(B, 1, 1, 1, dtype=torch.int32, device=device), Tq, Tk)
    scale = D ** -0.5
    do = torch.randn(B, Tq, Hq, Dv, generator=g).to(device, dtype)
    dlse = torch.randn(B, Hq, Tq, generator=g).to(device)
    op_sel = None if masked_op else sel
    got = run_backend(q, k, v, op_sel, backend, causal=causal, scale=scale, do=do, dlse=dlse, cu_seqlens=cu_seqlens,
                      mask=mask)
    ref = run_backend(q.double(), k.double(), v.double(), op_sel, "reference", causal=causal, scale=scale,
                      do=do.double(), dlse=dlse.double(), cu_seqlens=cu_seqlens, mask=mask)
    base = baseline(q, k, v, sel, causal=causal, scale=scale, do=do, dlse=dlse.to(dtype),
                    cu_seqlens=cu_seqlens, chunk=chunk, mask=mask)
    names = ("out", "lse", "dq", "dk", "dv") if backward else ("out", "lse")
    for name, a, o, b in zip(names, got, ref, base):
        assert_close_rule(a, o, b, f"{backend} {name}")
    return sel


HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
              "aten::unique_consecutive", "aten::masked_select", "aten::item")


def host_reads(fn) -> dict[str, int]:
    """The aten ops one call of `fn` makes that read a tensor's values back to the host (`.item()`,
    `int()` / `bool()` of a tensor, `nonzero`, `unique`, `masked_select`): on the CPU they cost
    nothing, on a GPU each is a host sync and breaks CUDA-graph capture. Counted by a dispatch mode,
    so the check runs on any device."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    found: Counter = Counter()

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in HOST_READS:
                found[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    with Reads():
        fn()
    return dict(found)
