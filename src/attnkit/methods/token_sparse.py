"""`token_sparse`: Token Sparse Attention, per-head token selection run as gather -> dense -> scatter.

Per query head, the last `n_last` queries of each sequence attend (causal softmax) to every key;
summed over those queries, the attention scores each token. Dynamic token coverage keeps the first
`sinks` and the last `window` tokens, then tokens by descending score while the kept score is
below `coverage` times the total: a number of tokens `L'` that adapts to how concentrated the
head's attention is. The kept rows of q, k and v are gathered into contiguous `[L', D]` tensors,
dense causal attention runs on them (SDPA, i.e. cuDNN / flash on a GPU, or the reference), and
the outputs are scattered back. A query row that was not kept outputs 0 (LSE `-inf`): in a model
the residual stream carries it, and the next layer chooses again.

Fixed here where the paper leaves a choice: the token score comes from the last `n_last` queries'
attention (as MInference's estimate), the last `window` tokens are always kept (they include
those queries), and the coverage is per query head (K/V rows are gathered per query head under
GQA). Prefill only: `Tq == Tk`; a decode step (`Tq == 1`) attends densely; other `Tq != Tk` raise.
Sizing the gathered tensors is the one host sync (the largest `L'`).

Selection (`policy`, `kept`): `KVSelection(indices [B (N under varlen), Hq, 1, L'max], q_block=Tq,
k_block=1)`: the kept tokens of each head (ascending, -1 padded); the gather-dense-scatter executor
reads them as "these queries attend to these keys, the other queries to nothing". `select` returns
that visibility as an exact mask predicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, AttnkitError, OptionError, validate_attention
from ..core.masks import Mask
from ..core.selection import KVSelection
from ..ops.dense import dense_attention
from ..core.checks import check_int
from ..registry import Backend, Capabilities, MethodOptions, MethodSpec, register
from ._prefill_estimate import bitmap_rows, coverage_keep, last_query_probs
from .router import Packing, seq_view


@dataclass(frozen=True)
class TokenSparseOptions(MethodOptions):
    coverage: float = 0.9  # fraction of the estimated attention the kept tokens must hold
    n_last: int = 64  # last queries whose attention scores the tokens
    sinks: int = 4  # leading tokens always kept
    window: int = 64  # trailing tokens always kept

    def __post_init__(self) -> None:
        c = self.coverage
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise OptionError(f"coverage: expected a float in (0, 1], got {c!r}")
        check_int("n_last", self.n_last, 1)
        check_int("sinks", self.sinks, 0)
        check_int("window", self.window, 0)

    def check_call(self, call: AttentionCall) -> None:
        if call.tq != call.tk and call.tq != 1 and call.tq * call.tk > 0:  # empty calls give empty results
            raise AttnkitError(f"q: method 'token_sparse' needs Tq == Tk (prefill) or Tq == 1 (decode), "
                               f"got Tq={call.tq}, Tk={call.tk}")


def kept_tokens(call: AttentionCall, opts: TokenSparseOptions) -> torch.Tensor:
    """Dynamic token coverage: bool `[N, Hq, T]` (N sequences, padded under varlen)."""
    view = seq_view(call)
    with torch.no_grad():
        probs, pos = last_query_probs(view, opts.n_last, call.scale)  # [N, Hq, L, T]
        T = view.tk
        j = torch.arange(T, device=probs.device).view(1, 1, -1)
        k_len = view.k_len.view(-1, 1, 1)
        cand = (j < k_len).expand(-1, probs.shape[1], -1)
        forced = (j < opts.sinks) | (j >= k_len - opts.window)
        return coverage_keep(probs.sum(2), cand, forced.expand_as(cand), float(opts.coverage))


def policy(call: AttentionCall, opts: TokenSparseOptions) -> KVSelection:
    """The kept tokens of a validated call as `[N, Hq, 1, L'max]` ids (one host sync: L'max)."""
    keep = kept_tokens(call, opts)
    width = max(1, int(keep.sum(-1).max()))
    return KVSelection(bitmap_rows(keep, width).unsqueeze(2), q_block=call.tq, k_block=1)


def gather_dense_scatter(call: AttentionCall, opts: TokenSparseOptions, backend: str) -> Any:
    """Run the method: gather the kept rows per head, dense causal attention, scatter back."""
    if call.tq == 1:
        return dense_attention(call.q, call.k, call.v, causal=call.causal, scale=call.scale,
                               return_lse=call.return_lse, backend=backend)
    ids = policy(call, opts).indices[:, :, 0].long()  # [N, Hq, L']
    packing = Packing(call.cu_seqlens, call.device) if call.cu_seqlens is not None else None
    q, k, v = (x if packing is None else packing.pad(x) for x in (call.q, call.k, call.v))
    N, T, Hq, _ = q.shape
    G = Hq // k.shape[2]
    valid = ids >= 0
    idx = ids.clamp_min(0)
    n = torch.arange(N, device=q.device).view(N, 1, 1)
    h = torch.arange(Hq, device=q.device).view(1, Hq, 1)
    qg, kg, vg = q[n, idx, h], k[n, idx, h // G], v[n, idx, h // G]  # [N, Hq, L', D]
    Lp = idx.shape[-1]
    flat = lambda x: x.reshape(N * Hq, Lp, 1, x.shape[-1])  # noqa: E731
    res = dense_attention(flat(qg), flat(kg), flat(vg), causal=True, scale=call.scale, return_lse=call.return_lse,
                          backend=backend)
    og, lg = res if call.return_lse else (res, None)
    rows = torch.where(valid, idx, torch.full_like(idx, T))  # padding rows land on a dropped extra row
    out = q.new_zeros(N, T + 1, Hq, v.shape[-1]).index_put((n, rows, h), og.view(N, Hq, Lp, -1))[:, :T]
    if packing is not None:
        out = packing.unpad(out)
    if not call.return_lse:
        return out
    lse = torch.full((N, Hq, T + 1), float("-inf"), dtype=lg.dtype, device=q.device)
    lse = lse.index_put((n, h, rows), lg.view(N, Hq, Lp))[..., :T]
    if packing is not None:
        lse = packing.unpad(lse.transpose(1, 2)).transpose(1, 2)
    return out, lse


def kept(q: torch.Tensor, k: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
         scale: Optional[float] = None, coverage: float = 0.9, n_last: int = 64, sinks: int = 4,
         window: int = 64) -> KVSelection:
    """The kept tokens for `q: [B, T, Hq, D]`, `k: [B, T, Hkv, D]` (causal prefill).

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, 1, L'max], q_block=T, k_block=1)`."""
    call = validate_attention(q, k, k, causal=True, scale=scale, cu_seqlens=cu_seqlens)
    opts = TokenSparseOptions(coverage, n_last, sinks, window)
    opts.check_call(call)
    return policy(call, opts)


def select(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: Optional[float] = None,
           coverage: float = 0.9, n_last: int = 64, sinks: int = 4, window: int = 64) -> Mask:
    """The exact visibility of the method as a mask predicate (what the benchmark's recall and
    density read): query i of head h sees key j iff both tokens are kept for h (the causal rule is
    applied on top). Single sequences (no varlen)."""
    if not causal:
        raise OptionError("causal: method 'token_sparse' is causal only, got causal=False")
    call = validate_attention(q, k, k, causal=True, scale=scale)
    opts = TokenSparseOptions(coverage, n_last, sinks, window)
    opts.check_call(call)
    return kept_mask(kept_tokens(call, opts))


def kept_mask(keep: torch.Tensor) -> Mask:
    """`keep [N, Hq, T]` as a mask predicate: query i of head h sees key j iff both are kept for h."""

    def fn(b: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return keep[b, h, q_pos] & keep[b, h, k_pos]

    return Mask(fn, "token_sparse", head_dependent=True)


def visibility(call: AttentionCall, opts: TokenSparseOptions) -> Optional[Mask]:
    """The exact visibility of a validated call (sequence-local positions under varlen); None for a
    decode step, which attends densely."""
    return None if call.tq == 1 else kept_mask(kept_tokens(call, opts))


def _example(call: AttentionCall) -> dict[str, Any]:
    return {"coverage": 0.9, "n_last": 4, "sinks": 1, "window": 2}


SPEC = register(
    MethodSpec(
        name="token_sparse",
        family="prefill",
        paper="Token Sparse Attention (Jo et al., 2026)",
        summary="per head, the tokens covering most of the last queries' attention, gathered into dense attention and scattered back",
        options=TokenSparseOptions,
        capabilities=Capabilities(non_causal=False, selection_reads_whole_prompt=True, decode_dense=True),
        visibility=visibility,
        backends=(
            Backend("sdpa", lambda call, opts: gather_dense_scatter(call, opts, "sdpa"), lse=False),
            Backend("reference", lambda call, opts: gather_dense_scatter(call, opts, "reference")),
        ),
        docs="docs/methods/token_sparse.md",
        example=_example,
    )
)
