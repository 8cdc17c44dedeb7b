"""Sparse decoding: read fewer keys of the cache, evict nothing.

A *reader* turns the decode queries `q: [B, Tq, Hq, D]` and a `PagedLayerCache` into a
`KVSelection` over the cache's logical slots (`select`) and attends through
`ops.decode_attention` (`attend`); SANTA, whose output is not a softmax over a subset, has its
own estimator.

| name | reads |
|---|---|
| `quest` | the `topk` pages with the largest upper bound `sum_d max(q_d min_d, q_d max_d)` of the score (Quest) |
| `recycled` | every `stride` steps everything; in between the `topk` keys the last full step attended most, plus tokens added since (Recycled Attention) |
| `santa` | `samples` keys drawn from the softmax (stratified by default, seeded); output = mean of their values (SANTA) |
| `routed` | the selection of a content-routed method (`moba`, ...) at the decode queries, over the cache |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from .. import config, kernels
from ..core.checks import check_int
from ..core.contract import AttnkitError, OptionError, validate_attention
from ..core.selection import KVSelection
from ..ops.decode import check_decode, decode_attention, slot_visibility
from ..registry import get_method, parse_options
from .paged import PagedLayerCache


def _group_queries(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """`[B, Tq, Hq, D]` -> `[B, Hkv, G * Tq, D]` float32 (float64 kept)."""
    B, Tq, Hq, D = q.shape
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.to(cd).view(B, Tq, hkv, Hq // hkv, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, -1, D)


def _rows_to_selection(rows: torch.Tensor, tq: int, k_block: int) -> KVSelection:
    """`rows [B, Hkv, S]` (-1 padded, no duplicates, in range: built here) -> `KVSelection(B, Hkv, 1, S)`
    for all Tq queries, marked trusted (decode validates its shape only: no host sync)."""
    return KVSelection(rows.unsqueeze(2).to(torch.int32).contiguous(), q_block=tq, k_block=k_block, trusted=True)


class Reader:
    """Base: `select` gives a selection (None = read everything), `attend` runs decode over it."""

    name: ClassVar[str] = ""

    def select(self, q: torch.Tensor, cache: PagedLayerCache, scale: float) -> Optional[KVSelection]:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, cache: PagedLayerCache, *, scale: Optional[float] = None,
               backend: str = "auto") -> torch.Tensor:
        scale = check_decode(q, cache, None, scale)  # before select: a reader may keep state
        return decode_attention(q, cache, self.select(q, cache, scale), scale=scale, backend=backend)


# --- quest -----------------------------------------------------------------------------------


@dataclass
class Quest(Reader):
    """Quest: page-level top-k by an upper bound of `q . k` from each page's element-wise key min/max
    (kept incrementally by the cache). Per KV head, the bound is the max over its query heads and
    decode queries, so one page list serves the whole group (one pass in the kernel). The page(s)
    holding the tokens being decoded are always read and count toward `topk`, as in Quest's own
    kernels: a partly filled last page has a tight bound that full pages' loose bounds would beat,
    and without it a query would miss its own and its nearest tokens."""

    name: ClassVar[str] = "quest"
    topk: int = 8

    def __post_init__(self) -> None:
        check_int("topk", self.topk, 1)

    def page_scores(self, q: torch.Tensor, cache: PagedLayerCache, force_newest: bool = False) -> torch.Tensor:
        """Upper bounds per logical page: `[B, Hkv, maxp]` float32 (float64 for a float64 query;
        -inf for unallocated or empty pages; with `force_newest`, +inf for the pages holding a
        position of the decode queries).

        `max_d(q_d lo_d, q_d hi_d)` summed over d is `relu(q) . hi + min(q, 0) . lo`, so the bound is
        two matmuls. On CUDA a Triton kernel gathers the bounds through the page table itself
        (`kernels/selection/quest.py`); elsewhere (and in float64) the pages' bounds are gathered first."""
        kmin, kmax = cache.page_bounds()  # [P, D]
        newest = cache.page_newest()  # [P]
        B, H = cache.batch, cache.num_heads
        mod = None if q.dtype == torch.float64 else \
            kernels.module_for("selection.quest", q.device, config.get().quest_kernel_devices)
        if mod is not None:
            rows = mod.quest_page_scores(q, kmin, kmax, cache.page_table.view(B * H, -1), newest, cache.seen,
                                         force_newest)
            return rows.view(B, H, -1)
        first = cache.seen - q.shape[1] if force_newest else torch.full_like(cache.seen, 2**62)  # [B]
        qg = _group_queries(q, H)  # [B, Hkv, GTq, D]
        pt = cache.page_table.long().view(B, H, -1)  # [B, Hkv, maxp]
        lo, hi = kmin[pt.clamp_min(0)], kmax[pt.clamp_min(0)]  # [B, Hkv, maxp, D]
        empty = (pt < 0) | torch.isinf(lo[..., 0])  # a page holding a valid key has finite bounds
        lo = lo.to(qg.dtype).masked_fill(empty.unsqueeze(-1), 0.0)
        hi = hi.to(qg.dtype).masked_fill(empty.unsqueeze(-1), 0.0)
        bound = qg.clamp_min(0) @ hi.transpose(-1, -2) + qg.clamp_max(0) @ lo.transpose(-1, -2)  # [B, Hkv, GTq, maxp]
        bound = bound.amax(2).masked_fill(newest[pt.clamp_min(0)] >= first.view(B, 1, 1), float("inf"))
        return bound.masked_fill(empty, float("-inf"))

    def select(self, q: torch.Tensor, cache: PagedLayerCache, scale: float) -> KVSelection:
        """The `topk` pages with the largest bounds per KV head (ties to the smaller page; pages
        scoring -inf are never listed). On CUDA: the bound kernel and a radix select, with no host
        sync (a decode step can be captured in a CUDA graph)."""
        check_decode(q, cache, None, scale)
        s = self.page_scores(q, cache, force_newest=True)  # [B, Hkv, maxp]
        B, H, maxp = s.shape
        mod = kernels.module_for("selection.quest", s.device, config.get().quest_radix_devices) \
            if s.dtype == torch.float32 else None
        if mod is not None:
            idx = mod.quest_top_pages(s.view(B * H, maxp), self.topk).view(B, H, -1)
        else:
            idx = top_pages(s, self.topk)
        return _rows_to_selection(idx, q.shape[1], cache.page_size)


def top_pages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The definition of Quest's choice: per row of `scores [..., maxp]`, the `k` largest, equal
    scores by the smaller page first (a stable descending sort), `-1` for any that scores `-inf`
    (unallocated or empty): `[..., min(k, maxp)]` int64."""
    val, idx = scores.sort(dim=-1, descending=True, stable=True)
    k = min(k, scores.shape[-1])
    return torch.where(torch.isneginf(val[..., :k]), -1, idx[..., :k])


# --- recycled --------------------------------------------------------------------------------


def slot_attention(q: torch.Tensor, cache: PagedLayerCache, scale: float) -> torch.Tensor:
    """Softmax attention each logical slot receives, summed over query heads of its group and the
    decode queries: `[B, Hkv, L]` (a reference pass, for recycling and tests)."""
    lg = cache.logical()
    B, Tq, Hq, D = q.shape
    H = cache.num_heads
    vis = slot_visibility(q, cache, lg, None, True)  # [B, Hkv, G, Tq, L]
    qg = _group_queries(q, H).view(B, H, Hq // H, Tq, D)
    s = torch.matmul(qg, lg["k"].to(qg.dtype).unsqueeze(2).transpose(-1, -2)) * scale
    s = (s + lg["bias"].to(s.dtype).view(B, H, 1, 1, -1)).masked_fill(~vis, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0).sum((2, 3))


@dataclass
class Recycled(Reader):
    """Recycled Attention: every `stride` decode steps attend to the whole cache and remember the
    `topk` slots that got the most attention (summed over the KV group); the steps in between
    attend to those slots plus the full step's own tokens and every token appended since.
    The step counter lives in the cache's per-layer state.

    A step in between lists its slots in a row of fixed width, known on the host: the remembered
    slots, plus the full step's Tq, plus the tokens appended since (the cache's host count), at
    most the cache's slots; -1 pads the rest. So no step reads a value back from the device, and a
    step can be captured in a CUDA graph (the width grows with the tokens appended: one graph per
    step). The bound holds while each row's positions are distinct (the cache's own numbering)."""

    name: ClassVar[str] = "recycled"
    stride: int = 4
    topk: int = 64

    def __post_init__(self) -> None:
        check_int("stride", self.stride, 1)
        check_int("topk", self.topk, 1)

    def select(self, q: torch.Tensor, cache: PagedLayerCache, scale: float) -> Optional[KVSelection]:
        check_decode(q, cache, None, scale)  # before the step counter moves
        st = cache.state.setdefault("recycled", {"step": 0})
        step = st["step"]
        st["step"] = step + 1
        if step % self.stride == 0:
            mass = slot_attention(q, cache, scale)  # [B, Hkv, L]
            k = min(self.topk, mass.shape[-1])
            val, idx = mass.topk(k, dim=-1)
            valid = slot_positions(cache).gather(-1, idx) >= 0
            st["slots"] = torch.where(valid, idx, -1)
            st["since"] = cache.seen.clone() - q.shape[1]  # tokens from here on are "new"
            st["own"], st["appended"] = q.shape[1], cache.appended  # host counts: how many can be new
            return None
        pos = slot_positions(cache)  # [B, Hkv, L], -1 free
        live = pos >= 0
        new = live & (pos >= st["since"].view(-1, 1, 1))
        L = new.shape[-1]
        old = st["slots"]  # [B, Hkv, topk], -1 padded: padding goes to a spare column L, then dropped
        chosen = torch.zeros(*new.shape[:-1], L + 1, dtype=torch.bool, device=new.device)
        chosen.scatter_(-1, torch.where(old >= 0, old, L), True)
        chosen = chosen[..., :L] & live  # a recycled slot may have been evicted and reused: keep only live ones
        chosen |= new
        width = max(min(L, old.shape[-1] + st["own"] + cache.appended - st["appended"]), 1)
        ids = torch.arange(L, device=new.device).expand_as(new)
        rows = torch.where(chosen, ids, L + ids).sort(-1).values[..., :width]
        rows = torch.where(rows < L, rows, -1)
        return _rows_to_selection(rows, q.shape[1], 1)


def slot_positions(cache: PagedLayerCache) -> torch.Tensor:
    """Original position held by every logical slot: `[B, Hkv, L]` int64, -1 free (no key or
    value gathered)."""
    flat, allocated = cache.flat_slots()
    pos = torch.where(allocated, cache.pos_pool.view(-1)[flat], -1)
    return pos.view(cache.batch, cache.num_heads, -1)


# --- santa -----------------------------------------------------------------------------------


@dataclass
class Santa(Reader):
    """SANTA (stochastic sparse attention): per query head, draw `samples` key indices from the
    softmax distribution and output the mean of their values, an unbiased estimate of attention.
    `stratified=True` draws one sample from each of `samples` equal slices of the CDF
    (systematic sampling, lower variance). Seeded: the same `seed` gives the same outputs."""

    name: ClassVar[str] = "santa"
    samples: int = 64
    seed: int = 0
    stratified: bool = True
    _generators: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_int("samples", self.samples, 1)
        check_int("seed", self.seed, 0)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return self._generators[key]

    def select(self, q: torch.Tensor, cache: PagedLayerCache, scale: float) -> Optional[KVSelection]:
        raise AttnkitError("santa: output is a mean over sampled values, not attention over a selection; use attend()")

    def attend(self, q: torch.Tensor, cache: PagedLayerCache, *, scale: Optional[float] = None,
               backend: str = "auto") -> torch.Tensor:
        """`out [B, Tq, Hq, Dv]`: mean of the values of the sampled keys (0 where nothing is visible)."""
        scale = check_decode(q, cache, None, scale)
        lg = cache.logical()
        B, Tq, Hq, D = q.shape
        H = cache.num_heads
        G = Hq // H
        vis = slot_visibility(q, cache, lg, None, True)  # [B, Hkv, G, Tq, L]
        qg = _group_queries(q, H).view(B, H, G, Tq, D)
        s = torch.matmul(qg, lg["k"].to(qg.dtype).unsqueeze(2).transpose(-1, -2)) * scale
        s = (s + lg["bias"].to(s.dtype).view(B, H, 1, 1, -1)).masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # [B, Hkv, G, Tq, L]
        L, S = p.shape[-1], self.samples
        gen = self._generator(q.device)
        cdf = p.cumsum(-1)
        cdf = cdf / cdf[..., -1:].clamp_min(torch.finfo(cdf.dtype).tiny)
        u = torch.rand(*p.shape[:-1], S, generator=gen, device=q.device, dtype=cdf.dtype)
        if self.stratified:
            u = (torch.arange(S, device=q.device, dtype=cdf.dtype) + u) / S
        idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp_max(L - 1)  # [.., S]
        v = lg["v"].to(qg.dtype)  # [B, Hkv, L, Dv]
        picked = v.unsqueeze(2).unsqueeze(3).expand(B, H, G, Tq, L, v.shape[-1]).gather(
            4, idx.unsqueeze(-1).expand(*idx.shape, v.shape[-1]))
        out = picked.mean(4)  # [B, Hkv, G, Tq, Dv]
        out = torch.where(vis.any(-1, keepdim=True), out, torch.zeros_like(out))
        return out.permute(0, 3, 1, 2, 4).reshape(B, Tq, Hq, -1).to(q.dtype)


# --- content-routed methods at decode time ------------------------------------------------------


@dataclass
class Routed(Reader):
    """Decode with a registered method's own selection (its spec's `select(call, opts)` at the decode
    queries over the cached keys). The cache must hold a contiguous prefix (positions
    `0 .. seen-1`, nothing evicted), so that key blocks mean what the method means by them; the
    selection is mapped from position-ordered keys back to logical slots.

    When the cache knows on the host that it holds such a prefix (`cache.prefix`: appended at the
    default positions, nothing evicted), the keys' count comes from there and the step reads
    nothing back from the device (capturable in a CUDA graph, where the method's selection is too).
    Otherwise the prefix is checked on the device and read back, and sequences of different
    lengths (a padded batch) select one at a time."""

    name: ClassVar[str] = "routed"
    method: str = "moba"
    options: dict = field(default_factory=dict)

    def _spec(self) -> Any:
        try:
            spec = get_method(self.method)
        except AttnkitError as e:
            raise OptionError(str(e)) from None
        if spec.select is None:
            raise OptionError(f"method: {self.method!r} has no selection (select(call, opts)) to decode with")
        return spec

    def select(self, q: torch.Tensor, cache: PagedLayerCache, scale: float) -> KVSelection:
        n = cache.prefix
        if n:
            k, slots = _prefix_by_position(cache, n)
            return self._select(q, k, slots, n, cache.num_heads)
        kept = cache.kept(by_position=True)
        pos = kept["pos"]
        seen = cache.seen.tolist()
        N = pos.shape[-1]
        expect = torch.arange(N, device=pos.device)
        full = (pos == expect) | ((pos < 0) & (expect >= cache.seen.view(-1, 1, 1)))
        if not bool(full.all()) or (kept["valid"].sum(-1) != cache.seen.view(-1, 1)).any():
            raise AttnkitError(f"cache: routed decode ({self.method}) needs every head to hold positions 0..seen-1 "
                               "(no eviction)")
        k = kept["k"].transpose(1, 2)  # [B, N, Hkv, D], position order
        if len(set(seen)) == 1:
            return self._select(q, k, kept["slot"], seen[0], cache.num_heads)
        # rows of different lengths (a padded batch): each row selects over its own keys
        parts = [self._select(q[b:b + 1], k[b:b + 1, :seen[b]], kept["slot"][b:b + 1, :, :seen[b]], seen[b],
                              cache.num_heads) for b in range(len(seen))]
        width = max(p.indices.shape[-1] for p in parts)
        rows = [torch.nn.functional.pad(p.indices, (0, width - p.indices.shape[-1]), value=-1) for p in parts]
        return KVSelection(torch.cat(rows, 0).contiguous(), q_block=parts[0].q_block, k_block=1, trusted=True)

    def _select(self, q: torch.Tensor, k: torch.Tensor, slots: torch.Tensor, n: int, H: int) -> KVSelection:
        """The selection of `q [B, Tq, Hq, D]` over the keys `k [B, n, Hkv, D]` in position order,
        as rows of logical slots (`slots [B, Hkv, n]`: the slot holding each position), marked
        trusted: slot ids are in range by construction, rows as free of duplicates as the method's."""
        spec = self._spec()
        call = validate_attention(q, k, k, causal=True)
        sel = spec.select(call, parse_options(spec, call, self.options))
        # selection over position-ordered keys (blocks of k_block) -> token-level rows over slots
        B, Tq, Hq, _ = q.shape
        kb = sel.k_block
        blocks = sel.indices.long()  # [B, Hsel, Nq, S]
        tok = (blocks.unsqueeze(-1) * kb + torch.arange(kb, device=blocks.device))  # [B, Hsel, Nq, S, kb]
        tok = torch.where((blocks.unsqueeze(-1) >= 0) & (tok < n), tok, -1).flatten(-2)
        hs = sel.num_heads
        if hs == Hq:  # each KV head has its own slot layout
            src = slots.repeat_interleave(Hq // H, 1)  # [B, Hq, n]
        else:
            src = slots
            tok = tok.expand(B, H, *tok.shape[2:])  # Hsel in (Hkv, 1): one row per KV head
        flat = src.unsqueeze(2).expand(*tok.shape[:3], n).gather(-1, tok.clamp_min(0))
        rows = torch.where(tok >= 0, flat, -1).to(torch.int32)
        return KVSelection(rows.contiguous(), q_block=sel.q_block, k_block=1, trusted=True)


def _prefix_by_position(cache: PagedLayerCache, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a cache whose every row holds exactly positions `0 .. n-1`: `(k [B, n, Hkv, D] in position
    order, slots [B, Hkv, n]: the logical slot holding each position)`, without a read-back."""
    flat, allocated = cache.flat_slots()  # [R, L]
    pos = torch.where(allocated, cache.pos_pool.view(-1)[flat], -1)
    R, L = pos.shape
    ids = torch.arange(L, device=pos.device).expand(R, L)
    # free slots (and, were the prefix wrong, positions past it) land in a spare column n, then dropped
    slot = torch.zeros(R, n + 1, dtype=torch.int64, device=pos.device)
    slot.scatter_(1, torch.where((pos >= 0) & (pos < n), pos, n), ids)
    slot = slot[:, :n]
    k = cache.k_pool.view(-1, cache.head_dim)[flat.gather(1, slot)]  # [R, n, D]
    B, H = cache.batch, cache.num_heads
    return k.view(B, H, n, -1).transpose(1, 2), slot.view(B, H, n)
