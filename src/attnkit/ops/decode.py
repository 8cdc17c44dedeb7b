"""The decode executor: attention of a few new queries over a paged KV cache.

`decode_attention(q, cache, selection=None)` with `q: [B, Tq, Hq, D]` (Tq of 1 to a few) and a
`kv.PagedLayerCache`. Keys are the cache's kept tokens; with `causal=True` query i of Tq sits at
position `seen - Tq + i` of its sequence and sees kept keys whose original position is not
larger. Each slot's log-weight is added to its score (a token standing for m tokens counts m
times). An optional `KVSelection` over the cache's *logical slots* (`k_block` slots per block,
e.g. `k_block = page_size` for page-level selection, 1 for token-level) restricts what is read;
its `Nq` is `ceil(Tq / q_block)`.

Backends: `reference` (pure PyTorch, any dtype incl. float64, LSE), `sdpa` (dense only, no LSE)
and `triton` (split-K kernel reading only selected pages / tokens, GQA-aware; CUDA, or the CPU
under `TRITON_INTERPRET=1` when requested explicitly).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .. import config
from ..core.contract import AttnkitError, check_tensor, plain_scalar
from ..core.selection import KVSelection
from .dispatch import Backend, Explanation, pick

BACKENDS = ("triton", "sdpa", "reference")


# what the op reads of a cache (`kv.PagedLayerCache` has it; ops sit below kv and do not import it)
CACHE_API = ("batch", "head_dim", "num_heads", "page_size", "capacity", "seen", "device", "dtype", "logical")


def check_decode(q: object, cache: Any, selection: Optional[KVSelection], scale: Optional[float]) -> float:
    """Validate a decode call (query against the cache, selection, scale); returns the scale."""
    q = check_tensor("q", q, 4, "[B, Tq, Hq, D]")
    if isinstance(cache, type) or not all(hasattr(cache, name) for name in CACHE_API):
        raise AttnkitError(f"cache: expected an attnkit.kv.PagedLayerCache, got {type(cache).__name__}")
    B, Tq, Hq, D = q.shape
    if B != cache.batch or D != cache.head_dim:
        raise AttnkitError(f"q: expected [B={cache.batch}, Tq, Hq, D={cache.head_dim}] (the cache's), got {tuple(q.shape)}")
    if Tq == 0 or Hq % cache.num_heads:
        raise AttnkitError(f"q: expected Tq >= 1 and Hq a multiple of the cache's Hkv={cache.num_heads}, got {tuple(q.shape)}")
    if q.dtype != cache.dtype or q.device != cache.device:
        raise AttnkitError(f"q: expected dtype {cache.dtype} on {cache.device} (the cache's), got {q.dtype} on {q.device}")
    if selection is not None:
        if not isinstance(selection, KVSelection):
            raise AttnkitError(f"selection: expected an attnkit KVSelection or None, got {type(selection).__name__}")
        selection.validate(B, Hq, cache.num_heads, Tq, cache.capacity)
    scale = plain_scalar(scale)
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise AttnkitError(f"scale: expected a finite float > 0 or None, got {scale!r}")
    return float(scale)


def query_positions(cache: Any, tq: int) -> torch.Tensor:
    """Position of each query: `[B, Tq]` = `seen - Tq + i` (the newest Tq tokens)."""
    return cache.seen.view(-1, 1) - tq + torch.arange(tq, device=cache.device)


def slot_visibility(q: torch.Tensor, cache: Any, lg: dict[str, torch.Tensor], selection: Optional[KVSelection],
                    causal: bool) -> torch.Tensor:
    """Which logical slots each query sees: `[B, Hkv, G, Tq, L]` bool (G = Hq // Hkv)."""
    B, Tq, Hq, _ = q.shape
    H = cache.num_heads
    G = Hq // H
    pos = lg["pos"]  # [B, Hkv, L]
    vis = lg["valid"].view(B, H, 1, 1, -1)
    if causal:
        qp = query_positions(cache, Tq).view(B, 1, 1, Tq, 1)
        vis = vis & (pos.view(B, H, 1, 1, -1) <= qp)
    if selection is not None:
        L = pos.shape[-1]
        idx = selection.indices.long()  # [B, Hsel, Nq, S]
        nb = -(-L // selection.k_block)
        blocks = torch.zeros(*idx.shape[:3], nb + 1, dtype=torch.bool, device=idx.device)
        blocks.scatter_(-1, torch.where(idx < 0, nb, idx), True)
        slot_block = torch.arange(L, device=idx.device) // selection.k_block
        rows = torch.arange(Tq, device=idx.device) // selection.q_block
        sel = blocks[:, :, rows][..., slot_block]  # [B, Hsel, Tq, L]
        hs = sel.shape[1]
        sel = sel.view(B, H, G, Tq, L) if hs == Hq else (sel.unsqueeze(2) if hs == H else sel.unsqueeze(1))
        vis = vis & sel
    return vis.expand(B, H, G, Tq, pos.shape[-1])


def decode_reference(q: torch.Tensor, cache: Any, selection: Optional[KVSelection], scale: float, causal: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch over every logical slot: `(out [B, Tq, Hq, Dv], lse [B, Hq, Tq])`."""
    B, Tq, Hq, D = q.shape
    H = cache.num_heads
    G = Hq // H
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    lg = cache.logical()
    vis = slot_visibility(q, cache, lg, selection, causal)
    qg = q.to(cd).view(B, Tq, H, G, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, D]
    s = torch.matmul(qg, lg["k"].to(cd).unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, Tq, L]
    s = s + lg["bias"].to(cd).view(B, H, 1, 1, -1)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)  # [B, Hkv, G, Tq]
    empty = torch.isinf(lse)
    p = torch.exp(s - torch.where(empty, 0, lse).unsqueeze(-1))
    out = torch.matmul(p, lg["v"].to(cd).unsqueeze(2))  # [B, Hkv, G, Tq, Dv]
    out = out.permute(0, 3, 1, 2, 4).reshape(B, Tq, Hq, -1)
    return out.to(q.dtype), lse.reshape(B, Hq, Tq).to(cd)


def decode_sdpa(q: torch.Tensor, cache: Any, scale: float, causal: bool) -> torch.Tensor:
    """Dense decode through PyTorch SDPA over the logical slots, free slots masked."""
    B, Tq, Hq, D = q.shape
    H = cache.num_heads
    lg = cache.logical()
    vis = slot_visibility(q, cache, lg, None, causal)  # [B, Hkv, G, Tq, L]
    bias = torch.where(vis, lg["bias"].view(B, H, 1, 1, -1), float("-inf")).reshape(B, Hq, Tq, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), lg["k"], lg["v"], attn_mask=bias.to(q.dtype),
                                         scale=scale, enable_gqa=Hq != H)  # [B, Hq, Tq, Dv]
    seen_any = vis.any(-1).reshape(B, Hq, Tq, 1)
    return torch.where(seen_any, out, torch.zeros_like(out)).transpose(1, 2)


def _triton_why_not(q: torch.Tensor, selection: Optional[KVSelection], hkv: int, page_size: int,
                    explicit: bool) -> Optional[str]:
    interpret = config.triton_interpret()
    if q.device.type != "cuda" and not (explicit and interpret):
        return "runs on CUDA (or on the CPU under TRITON_INTERPRET=1 when requested explicitly)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if q.dtype == torch.float64:
        return "no float64"
    if selection is not None:
        from ..kernels.decode import selection_mode  # lazy: imports triton

        _, reason = selection_mode(selection, page_size)
        if reason:
            return reason
        if selection.num_heads not in (1, hkv):
            return "per-query-head selection under GQA (the kernel reads one key list per KV head)"
    return None


class DecodeCall:
    """A validated decode call, as the dispatcher sees it (`device`, `dtype`, `return_lse`, ...)."""

    varlen = False

    def __init__(self, q: torch.Tensor, cache: Any, selection: Optional[KVSelection], scale: float, causal: bool,
                 return_lse: bool) -> None:
        self.q, self.cache, self.selection = q, cache, selection  # q: [B, Tq, Hq, D]
        self.scale, self.causal, self.return_lse = scale, causal, return_lse
        self.device, self.dtype, self.requires_grad = q.device, q.dtype, q.requires_grad
        self.tk = int(cache.capacity)


def _run_triton(call: DecodeCall, opts: Any) -> Any:
    from ..kernels.decode import paged_decode  # lazy: imports triton

    out, lse = paged_decode(call.q, call.cache, call.selection, scale=call.scale, causal=call.causal)
    return (out, lse) if call.return_lse else out


def _run_reference(call: DecodeCall, opts: Any) -> Any:
    out, lse = decode_reference(call.q, call.cache, call.selection, call.scale, call.causal)
    return (out, lse) if call.return_lse else out


DECLARED = (
    Backend("triton", _run_triton, auto_devices=("cuda",),
            supports=lambda c, o: _triton_why_not(c.q, c.selection, c.cache.num_heads, c.cache.page_size, True)),
    Backend("sdpa", lambda c, o: decode_sdpa(c.q, c.cache, c.scale, c.causal), lse=False,
            supports=lambda c, o: "a selection is given" if c.selection is not None else None),
    Backend("reference", _run_reference),
)
BACKENDS = tuple(b.name for b in DECLARED)


def decode_attention(q: torch.Tensor, cache: Any, selection: Optional[KVSelection] = None, *,
                     scale: Optional[float] = None, causal: bool = True, return_lse: bool = False,
                     backend: str = "auto") -> Any:
    """Attention of `q: [B, Tq, Hq, D]` over a `PagedLayerCache`'s kept tokens (optionally only
    the `selection`'s slots). Returns `out [B, Tq, Hq, Dv]`, or `(out, lse [B, Hq, Tq])`.

    `backend="auto"` takes `triton` on CUDA, else `sdpa` for dense calls without LSE, else
    `reference`."""
    chosen, _, call = plan(q, cache, selection, scale=scale, causal=causal, return_lse=return_lse, backend=backend)
    return chosen.run(call, None)


def plan(q: torch.Tensor, cache: Any, selection: Optional[KVSelection] = None, *, scale: Optional[float] = None,
         causal: bool = True, return_lse: bool = False, backend: str = "auto") -> tuple[Backend, Explanation, DecodeCall]:
    """Validate a `decode_attention` call and pick its backend (`attnkit.ops.explain` shows the decision)."""
    scale = check_decode(q, cache, selection, scale)
    if not isinstance(causal, bool):
        raise AttnkitError(f"causal: expected a bool, got {causal!r}")
    call = DecodeCall(q, cache, selection, scale, causal, return_lse)
    chosen, exp = pick("ops.decode_attention", DECLARED, call, None, backend)  # type: ignore[arg-type]
    return chosen, exp, call
