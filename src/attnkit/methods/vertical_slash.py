"""`vertical_slash`: MInference's vertical-slash pattern, training-free sparse prefill.

Per query head: the last `n_last` queries of each sequence attend (causally, softmax) to every
key. Summing that attention over the queries scores each key column (vertical); summing it along
diagonals scores each offset `d = i - j` (slash). The `n_vertical` best columns (the first `sinks`
forced in) and the `n_slash` best diagonals (the `window` nearest, d < window, forced in) are kept.

Execution is block-level (the choice fixed here; MInference runs slashes as 64-key ranges and
verticals as single columns): query block n keeps every key block holding a selected column
visible to it, or a key `i - d` for some position i of the block and selected diagonal d. The
causal rule applies token by token inside the blocks. A decode step (`Tq == 1`) attends densely.

Selection: `KVSelection(indices [B (N under varlen), Hq, ceil(Tq / block_size), S], block_size, block_size)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..core.contract import AttentionCall, OptionError, validate_attention
from ..core.selection import KVSelection, cdiv
from ..core.checks import check_int
from ..registry import Capabilities, MethodOptions, register_selection
from ._prefill_estimate import dense_selection, last_query_probs, slash_sums, vertical_slash_rows
from .router import seq_view


@dataclass(frozen=True)
class VerticalSlashOptions(MethodOptions):
    n_vertical: int = 1000  # key columns kept (sinks included)
    n_slash: int = 6096  # diagonals kept (window included)
    n_last: int = 64  # last queries whose attention scores the columns and diagonals
    block_size: int = 64
    sinks: int = 30  # leading key columns always kept
    window: int = 100  # nearest diagonals (d < window) always kept

    def __post_init__(self) -> None:
        for name, low in (("n_vertical", 1), ("n_slash", 1), ("n_last", 1), ("block_size", 1), ("sinks", 0),
                          ("window", 0)):
            check_int(name, getattr(self, name), low)
        if self.sinks > self.n_vertical:
            raise OptionError(f"sinks: expected <= n_vertical ({self.n_vertical}), got {self.sinks}")
        if self.window > self.n_slash:
            raise OptionError(f"window: expected <= n_slash ({self.n_slash}), got {self.window}")


def top_with_forced(score: torch.Tensor, valid: torch.Tensor, n_keep: int, n_forced: int) -> torch.Tensor:
    """`score [..., C]` -> bool `[..., C]`: the first `n_forced` valid entries and the best of the rest,
    `n_keep` in all (fewer when fewer are valid)."""
    C = score.shape[-1]
    idx = torch.arange(C, device=score.device)
    key = torch.where(idx < n_forced, torch.full((), float("inf"), dtype=score.dtype, device=score.device), score)
    key = torch.where(valid, key, torch.full((), float("-inf"), dtype=score.dtype, device=score.device))
    top = key.topk(min(n_keep, C), dim=-1).indices
    keep = torch.zeros_like(valid).scatter(-1, top, True)
    return keep & valid


def policy(call: AttentionCall, opts: VerticalSlashOptions) -> KVSelection:
    """The vertical-slash selection of a validated causal call (no gradients)."""
    view = seq_view(call)
    bs = opts.block_size
    if view.tq == 1:
        return dense_selection(view, bs)
    with torch.no_grad():
        probs, pos = last_query_probs(view, opts.n_last, call.scale)  # [N, Hq, L, Tk]
        Tk = view.tk
        j = torch.arange(Tk, device=probs.device)
        reach = pos[:, -1:]  # [N, 1] last query position of each sequence
        col_ok = (j.view(1, -1) <= reach) & (j.view(1, -1) < view.k_len.view(-1, 1))  # [N, Tk]
        cols = top_with_forced(probs.sum(2), col_ok.unsqueeze(1).expand_as(probs[:, :, 0]), opts.n_vertical, opts.sinks)
        diag_ok = j.view(1, -1) <= reach  # offsets some last query can reach
        diags = top_with_forced(slash_sums(probs, pos), diag_ok.unsqueeze(1).expand_as(probs[:, :, 0]), opts.n_slash,
                                opts.window)
        nk = cdiv(Tk, bs)
        width = min(nk, min(opts.n_vertical, nk) + 2 * min(opts.n_slash, nk + 1))
        rows = vertical_slash_rows(view, cols, diags, bs, width)
    return KVSelection(rows, q_block=bs, k_block=bs)


def select(q: torch.Tensor, k: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None,
           causal: bool = True, n_vertical: int = 1000, n_slash: int = 6096, n_last: int = 64, block_size: int = 64,
           sinks: int = 30, window: int = 100) -> KVSelection:
    """Vertical-slash selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]` (causal only).

    Returns `KVSelection(indices int32 [B (N under varlen), Hq, ceil(Tq / block_size), S], block_size, block_size)`."""
    call = validate_attention(q, k, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    if not causal:
        raise OptionError("causal: method 'vertical_slash' is causal only, got causal=False")
    opts = VerticalSlashOptions(n_vertical, n_slash, n_last, block_size, sinks, window)
    opts.check_call(call)
    return policy(call, opts)


def _example(call: AttentionCall) -> dict[str, Any]:
    bs = max(1, min(64, call.tk // 8))
    return {"block_size": bs, "n_vertical": 4, "n_slash": 4, "n_last": 8, "sinks": 1, "window": 2}


SPEC = register_selection(
    "vertical_slash",
    VerticalSlashOptions,
    policy,
    family="prefill",
    paper="MInference (Jiang et al., 2024)",
    summary="top key columns and diagonals from the last queries' attention, run as the key blocks they touch",
    example=_example,
    capabilities=Capabilities(non_causal=False, selection_reads_whole_prompt=True, decode_dense=True),
    flex_block=lambda opts: opts.block_size,
)
