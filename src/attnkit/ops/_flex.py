"""The `flex` backend: `torch.nn.attention.flex_attention` for block-level selections and masks.

A `KVSelection` becomes a FlexAttention `BlockMask` directly from its indices (`from_kv_blocks`),
never through a dense `Tq x Tk` mask: selected blocks strictly below the causal diagonal (and
inside the sequence) are *full* blocks that skip the mask function; the others are *partial*
blocks where the token rule (bottom-right causal, plus an optional mask predicate) runs. Blocks
that causality hides completely are dropped. A mask predicate alone becomes a BlockMask through
`create_block_mask` (compiled, evaluated block by block, cached per mask and shape).

FlexAttention is compiled once (`torch.compile(flex_attention)`), and torch.compile caches one
kernel per shape. CUDA only; no varlen; selection blocks must be multiples of 128 (FlexAttention's
sparse block size).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from ..core import availability
from ..core.contract import AttentionCall
from ..core.masks import Mask
from ..core.selection import KVSelection, cdiv
from ._backends import finish

FLEX_BLOCK = 128
_STATE: dict[str, Any] = {}
_MASK_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_MASK_CACHE_SIZE = 32


def _common_why_not(call: AttentionCall) -> Optional[str]:
    reason = availability.flex()
    if reason:
        return reason
    if call.device.type != "cuda":
        return f"FlexAttention backend runs on CUDA only (inputs are on {call.device.type})"
    if call.dtype == torch.float64:
        return "dtype fp64 not supported (fp16, bf16, fp32)"
    if call.varlen:
        return "no varlen (cu_seqlens) support in the flex backend"
    return None


def flex_why_not_mask(call: AttentionCall, mask: Mask) -> Optional[str]:
    return _common_why_not(call)


def _mask_mod(causal: bool, shift: int, mask: Optional[Mask], blocks: Optional[torch.Tensor] = None,
              q_block: int = 1, k_block: int = 1) -> Optional[Callable]:
    """FlexAttention mask_mod for the token rule: bottom-right causal (`shift = Tk - Tq`), a predicate,
    and membership in the selection (`blocks [B, H|1, Nq, Nk]` bool). FlexAttention runs it only
    inside partial blocks; it is also the whole truth for FlexAttention's eager (debug) path."""
    if not causal and mask is None and blocks is None:
        return None
    per_head = blocks is not None and blocks.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx):
        qp = q_idx + shift
        ok = kv_idx <= qp if causal else None
        if mask is not None:
            m = mask.fn(b, h, qp, kv_idx)
            ok = m if ok is None else (ok & m)
        if blocks is not None:
            m = blocks[b, h if per_head else 0, q_idx // q_block, kv_idx // k_block]
            ok = m if ok is None else (ok & m)
        return ok

    return mask_mod


def _compact(ids: torch.Tensor, keep: torch.Tensor, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of block ids where `keep`: `(count int32 [..], ids int32 [.., nk])`, kept ids first,
    ascending, then zero padding."""
    key = torch.where(keep, ids, ids.clamp_min(0) + nk)
    srt = key.sort(dim=-1).values
    width = srt.shape[-1]
    if width < nk:
        srt = torch.cat([srt, srt.new_full((*srt.shape[:-1], nk - width), 2 * nk)], dim=-1)
    srt = srt[..., :nk]
    count = keep.sum(-1).to(torch.int32)
    return count, torch.where(srt < nk, srt, torch.zeros_like(srt)).to(torch.int32).contiguous()


def selection_block_mask(selection: KVSelection, batch: int, hq: int, hkv: int, tq: int, tk: int, causal: bool,
                         mask: Optional[Mask] = None):
    """A FlexAttention BlockMask equal to `selection` (plus causality and `mask`), built from the
    indices in O(B * H * Nq * Nk / block) work, never from a `Tq x Tk` mask."""
    from torch.nn.attention.flex_attention import BlockMask

    qb, kb = selection.q_block, selection.k_block
    idx = selection.indices.long()
    hs = idx.shape[1]
    if hs != hq and hs != 1:  # shared by a KV group: one row per query head
        idx = idx.repeat_interleave(hq // hkv, dim=1)
    nq, nk = cdiv(tq, qb), cdiv(tk, kb)
    shift = tk - tq
    valid = idx >= 0
    qi = torch.arange(nq, device=idx.device).view(1, 1, nq, 1)
    last_q = torch.clamp_max((qi + 1) * qb, tq) - 1 + shift  # last query of the block, key coordinates
    if causal:
        valid &= idx * kb <= last_q
    if mask is None:
        full = valid & ((idx + 1) * kb <= tk) & ((qi + 1) * qb <= tq)
        if causal:
            full &= (idx + 1) * kb - 1 <= qi * qb + shift
    else:
        full = torch.zeros_like(valid)
    part_n, part_i = _compact(idx, valid & ~full, nk)
    full_n, full_i = _compact(idx, full, nk)
    kwargs = {}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (tq, tk)
    blocks = KVSelection(idx.to(torch.int32), qb, kb).to_dense_blocks(nk)  # [B, H|1, Nq, Nk]: O((T / block)^2)
    return BlockMask.from_kv_blocks(part_n, part_i, full_n, full_i, BLOCK_SIZE=(qb, kb),
                                    mask_mod=_mask_mod(causal, shift, mask, blocks, qb, kb), **kwargs)


def predicate_block_mask(mask: Mask, batch: int, hq: int, tq: int, tk: int, causal: bool, device: torch.device):
    """A BlockMask for a mask predicate (compiled `create_block_mask`, cached per mask and shape)."""
    from torch.nn.attention.flex_attention import create_block_mask

    heads = hq if mask.head_dependent else 1
    # compiled, so the predicate is evaluated block by block (eager would build [B, H, Tq, Tk])
    return cached_block_mask(
        (mask.name, batch, heads, tq, tk, causal, str(device)),
        lambda: call_compiled(create_block_mask, _mask_mod(causal, tk - tq, mask), batch, heads, tq, tk,
                              device=device, BLOCK_SIZE=FLEX_BLOCK, _compile=True))


def cached_block_mask(key: tuple, build: Callable[[], Any]) -> Any:
    """The BlockMask cached under `key` in the module's LRU, else `build()` (then cached).
    `key` must name everything the mask depends on (pattern, its parameters, shapes, device)."""
    bm = _MASK_CACHE.get(key)
    if bm is None:
        bm = build()
        _MASK_CACHE[key] = bm
        while len(_MASK_CACHE) > _MASK_CACHE_SIZE:
            _MASK_CACHE.popitem(last=False)
    else:
        _MASK_CACHE.move_to_end(key)
    return bm


def compiled_flex() -> Callable:
    """`torch.compile(flex_attention)`, built once per process (kernels cached per shape)."""
    fn = _STATE.get("flex")
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=False)
        _STATE["flex"] = fn
    return fn


# torch.compile recompiles `flex_attention` for every new shape and every new kind of mask_mod,
# and after `recompile_limit` (8 by default) falls back to FlexAttention's *unfused eager* path,
# which materialises the full `[B, H, Tq, Tk]` score matrix (an out-of-memory error at long T after
# a benchmark sweep of many shapes; docs/executors.md, "Dispatch by measurement"). Raise the limit for
# our calls, and make hitting it an error rather than a silent O(T^2) fallback.
FLEX_RECOMPILE_LIMIT = 256


def _compile_limits() -> dict[str, Any]:
    import torch._dynamo.config as dynamo_config

    names = {"recompile_limit": FLEX_RECOMPILE_LIMIT, "cache_size_limit": FLEX_RECOMPILE_LIMIT,
             "fail_on_recompile_limit_hit": True}
    found = {n: v for n, v in names.items() if hasattr(dynamo_config, n)}
    if "recompile_limit" in found:  # newer torch: cache_size_limit is an alias of it
        found.pop("cache_size_limit", None)
    return found


def call_compiled(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a compiled FlexAttention function with the recompile guard above."""
    import torch._dynamo

    with torch._dynamo.config.patch(**_compile_limits()):
        return fn(*args, **kwargs)


def run_flex_block_mask(call: AttentionCall, block_mask, flex: Optional[Callable] = None) -> Any:
    """FlexAttention over `[B, T, H, D]` inputs with a prepared BlockMask; `(out, lse)` per the call."""
    out, lse = flex_attention_lse(call.q, call.k, call.v, block_mask, call.scale, flex)
    return finish(call, out, lse.float())


def run_flex_selection(call: AttentionCall, selection: KVSelection, mask: Optional[Mask] = None) -> Any:
    bm = selection_block_mask(selection, call.batch, call.hq, call.hkv, call.tq, call.tk, call.causal, mask)
    return run_flex_block_mask(call, bm)


def run_flex_mask(call: AttentionCall, mask: Mask) -> Any:
    bm = predicate_block_mask(mask, call.batch, call.hq, call.tq, call.tk, call.causal, call.device)
    return run_flex_block_mask(call, bm)


# --- prefix patterns (NSA's compressed branch) -------------------------------------------------


def prefix_block_mask(num_visible: Callable[[torch.Tensor], torch.Tensor], mask_mod: Optional[Callable],
                      tq: int, tk: int, device: torch.device):
    """A BlockMask (shared by every batch and head) for a pattern where query `i` sees exactly the keys
    `j < num_visible(i)`, with `num_visible` nondecreasing in `i` (values outside `[0, tk]` are clamped).

    `num_visible(idx)` maps a tensor of query indices to visible-key counts; `mask_mod` must be the same
    rule as a token predicate (`kv_idx < num_visible(q_idx)`; None when every key is visible). The block
    structure is computed from `num_visible` at the first and last query of each query block, in
    O(Nq * Nk) work, and classifies blocks as `create_block_mask` does: a block is *full* when it lies
    inside `tq x tk` and the block's first query already sees all of its keys, *partial* when its last
    query sees some of them (the blocks that cross `tq` or `tk` are never full: FlexAttention bounds them,
    and the mask_mod runs there). `tq`, `tk` need not be multiples of `FLEX_BLOCK` (`seq_lengths`)."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = cdiv(tq, FLEX_BLOCK), cdiv(tk, FLEX_BLOCK)
    qb = torch.arange(nq, device=device, dtype=torch.int64)
    lo = num_visible(qb * FLEX_BLOCK).clamp(0, tk)  # keys every query of the block sees
    hi = num_visible(torch.clamp_max((qb + 1) * FLEX_BLOCK, tq) - 1).clamp(0, tk)  # keys some query sees
    # full key blocks: j < n_full, (j + 1) * FLEX_BLOCK <= lo (<= tk), in a query block inside tq
    inside = (qb + 1) * FLEX_BLOCK <= tq
    n_full = torch.where(inside, torch.div(lo, FLEX_BLOCK, rounding_mode="floor"), torch.zeros_like(lo))
    n_any = torch.div(hi + FLEX_BLOCK - 1, FLEX_BLOCK, rounding_mode="floor")  # blocks j with j * FLEX_BLOCK < hi
    n_part = (n_any - n_full).clamp_min(0)
    kb = torch.arange(nk, device=device, dtype=torch.int64).view(1, -1)
    full_i = torch.where(kb < n_full.view(-1, 1), kb, torch.zeros_like(kb))
    part_i = torch.where(kb < n_part.view(-1, 1), kb + n_full.view(-1, 1), torch.zeros_like(kb))
    as_mask = lambda x: x.to(torch.int32).view(1, 1, *x.shape[-2:]).contiguous()  # noqa: E731
    as_count = lambda x: x.to(torch.int32).view(1, 1, -1).contiguous()  # noqa: E731
    kwargs = {}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (tq, tk)
    if mask_mod is None:
        from torch.nn.attention.flex_attention import noop_mask as mask_mod
    return BlockMask.from_kv_blocks(as_count(n_part), as_mask(part_i), as_count(n_full), as_mask(full_i),
                                    BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, **kwargs)


def flex_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float,
                       flex: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention over `[B, T, H, D]` tensors (any Tq, Tk and GQA): `(out [B, Tq, Hq, Dv], lse [B, Hq, Tq])`,
    the LSE in natural log, float32 (float64 for float64 inputs). `flex` defaults to `compiled_flex()`
    (tests pass the eager `flex_attention`). A query whose row of the BlockMask sees no key gets out 0 and
    LSE -inf from FlexAttention itself (its eager path and its Triton kernels both treat such rows so)."""
    import torch.nn.attention.flex_attention as fa

    flex = flex or compiled_flex()
    aux = getattr(fa, "AuxRequest", None)  # return_lse is deprecated where AuxRequest exists
    kwargs = {"return_aux": aux(lse=True)} if aux is not None else {"return_lse": True}
    out, lse = call_compiled(flex, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                             scale=scale, enable_gqa=q.shape[2] != k.shape[2], **kwargs)
    if aux is not None:
        lse = lse.lse
    return out.transpose(1, 2), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
