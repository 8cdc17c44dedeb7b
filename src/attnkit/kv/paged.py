"""`PagedLayerCache`: one layer's KV cache in fixed-size pages with a page table (vLLM-style).

Each (sequence b, KV head h) pair is a *row* with its own list of pages, so heads may keep
different numbers of tokens (eviction is per head). A row's tokens live in *logical slots*:
slot `s` of row `r` is slot `s % page_size` of page `page_table[r, s // page_size]`. Every slot
stores the token's key, value, original position (`-1` = free), a log-weight (0 for ordinary
tokens; `log m` for a token standing for `m` tokens, e.g. RazorAttention's compensation token)
and a policy score (H2O's accumulated attention).

Attention is permutation-invariant over keys once RoPE is applied, so slots need not be in
position order: eviction only frees slots (no copy), appends fill free slots first, and a page
whose slots are all free goes back to the pool. Page-level selection (Quest) reads pages
through the table, and per-page key bounds are maintained incrementally (allocated on first use).

Memory follows what is kept: the pool grows by what an append needs plus a small headroom
(1/32 of the pool, never doubling), and `compact()` (run after a policy compresses a prompt)
repacks every row's kept tokens into `ceil(kept / page_size)` pages and releases the rest.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.contract import AttnkitError


def _check_pos_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttnkitError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


class PagedLayerCache:
    """KV cache of one attention layer: rows `B * Hkv`, pages of `page_size` tokens.

    Shapes: keys `[B, T, Hkv, D]`, values `[B, T, Hkv, Dv]` at the boundary (attnkit layout).
    """

    def __init__(self, batch: int, num_heads: int, head_dim: int, head_dim_v: Optional[int] = None, *,
                 page_size: int = 16, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 capacity_tokens: int = 0) -> None:
        self.batch = _check_pos_int("batch", batch)
        self.num_heads = _check_pos_int("num_heads", num_heads)
        self.head_dim = _check_pos_int("head_dim", head_dim)
        self.head_dim_v = _check_pos_int("head_dim_v", head_dim_v if head_dim_v is not None else head_dim)
        self.page_size = _check_pos_int("page_size", page_size)
        # resolve "cuda" to "cuda:N" so device comparisons with tensors hold
        self.dtype, self.device = dtype, torch.empty(0, device=device).device
        rows = self.rows
        pages = max(1, -(-_check_pos_int("capacity_tokens", capacity_tokens, 0) // page_size)) * rows
        self._alloc_pool(pages)
        self.page_table = torch.full((rows, 1), -1, dtype=torch.int32, device=self.device)  # [R, maxp]
        self.seen = torch.zeros(batch, dtype=torch.int64, device=self.device)  # tokens appended per sequence
        # host-side counts, known from shapes (readers size their selections from them, so a decode
        # step reads nothing back from the device): `appended`, tokens appended to a row at most
        # (the sum of every append's Tn); `prefix`, n when every row holds exactly positions 0..n-1
        # (only full appends at the default positions, nothing evicted or renumbered), else None
        self.appended = 0
        self.prefix: Optional[int] = 0
        self.state: dict = {}  # per-layer policy state (targets, recycled slots, ...)

    # --- storage -------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return self.batch * self.num_heads

    @property
    def num_pages(self) -> int:
        return self.k_pool.shape[0]

    def _alloc_pool(self, pages: int) -> None:
        ps, dev = self.page_size, self.device
        self.k_pool = torch.zeros(pages, ps, self.head_dim, dtype=self.dtype, device=dev)  # [P, ps, D]
        self.v_pool = torch.zeros(pages, ps, self.head_dim_v, dtype=self.dtype, device=dev)  # [P, ps, Dv]
        self.pos_pool = torch.full((pages, ps), -1, dtype=torch.int64, device=dev)  # [P, ps], -1 = free
        meta = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.bias_pool = torch.zeros(pages, ps, dtype=meta, device=dev)  # log-weight per slot
        self.score_pool = torch.zeros(pages, ps, dtype=torch.float32, device=dev)  # policy score per slot
        self.free_pages = torch.arange(pages - 1, -1, -1, dtype=torch.int64, device=dev)  # a stack
        # per-page key bounds and newest position (Quest): allocated by the first page_bounds() call
        self._kmin: Optional[torch.Tensor] = None  # [P, D] in the key dtype
        self._kmax: Optional[torch.Tensor] = None  # [P, D] in the key dtype
        self._pmax: Optional[torch.Tensor] = None  # [P] int64, newest position per page
        self._dirty = torch.ones(pages, dtype=torch.bool, device=dev)
        self._bounds_stale = True  # host-side: lets page_bounds() skip a device sync when nothing changed

    def _grow_pool(self, need: int) -> None:
        """Grow the pool so that `need` more pages are free, plus a headroom of 1/32 of the pool
        (appends while decoding do not copy the pool at every page, and it never doubles)."""
        old = self.num_pages
        new = old + max(need - self.free_pages.numel(), 0) + max(1, old // 32)
        saved = (self.k_pool, self.v_pool, self.pos_pool, self.bias_pool, self.score_pool, self.free_pages)
        bounds = (self._kmin, self._kmax, self._pmax, self._dirty, self._bounds_stale)
        self._alloc_pool(new)
        for dst, src in zip((self.k_pool, self.v_pool, self.pos_pool, self.bias_pool, self.score_pool), saved[:5]):
            dst[:old] = src
        if bounds[0] is not None:  # keep the incremental bounds: only the new pages are dirty
            self._alloc_bounds()
            self._kmin[:old], self._kmax[:old], self._pmax[:old], self._dirty[:old] = bounds[:4]
        extra = torch.arange(new - 1, old - 1, -1, dtype=torch.int64, device=self.device)
        self.free_pages = torch.cat([extra, saved[5]])

    def compact(self) -> None:
        """Repack every row's kept tokens into `ceil(kept / page_size)` fresh pages and shrink the pool
        to exactly those pages (keys, values, positions, log-weights and scores move with them).
        Logical slot ids change, so per-slot state held outside the cache must not outlive it: the
        session calls this right after a prompt is compressed, before decoding starts."""
        ps, R = self.page_size, self.rows
        flat, allocated = self.flat_slots()  # [R, L]
        valid = allocated & (self.pos_pool.view(-1)[flat] >= 0)
        n = valid.sum(1)  # [R]
        pages = -(-n // ps)
        total = int(pages.sum())
        if total == self.num_pages and int(self.free_pages.numel()) == 0 and bool(
                (pages == (self.page_table >= 0).sum(1)).all()):
            return  # already packed: nothing to release
        width = int(n.max()) if R else 0
        order = (~valid).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # kept slots first, in slot order
        src = flat.gather(1, order)  # [R, width] flat pool index of the j-th kept token of each row
        j = torch.arange(width, device=self.device)
        take = j < n.unsqueeze(1)
        start = pages.cumsum(0) - pages  # first new page of each row
        dst = (start.unsqueeze(1) + j // ps) * ps + j % ps
        src, dst = src[take], dst[take]
        saved = (self.k_pool, self.v_pool, self.pos_pool, self.bias_pool, self.score_pool)
        self._alloc_pool(max(total, 1))
        for new, old in zip((self.k_pool, self.v_pool, self.pos_pool, self.bias_pool, self.score_pool), saved):
            new.view(-1, *new.shape[2:])[dst] = old.view(-1, *old.shape[2:])[src]
        self.free_pages = self.free_pages[: self.num_pages - total]  # the pages above `total`, if any
        maxp = max(int(pages.max()) if R else 0, 1)
        col = torch.arange(maxp, device=self.device)
        self.page_table = torch.where(col < pages.unsqueeze(1), start.unsqueeze(1) + col, -1).to(torch.int32)

    def renumber(self, positions: torch.Tensor) -> None:
        """Give every kept token a new position: `positions [B, S]` maps an old position `p < S` of
        sequence b to `positions[b, p]` (>= 0). The tokens seen become `max + 1` per sequence. Used
        to count positions from each row's first real token once its padding is evicted."""
        B = self.batch
        if positions.dim() != 2 or positions.shape[0] != B or positions.shape[1] < int(self.seen.max()):
            raise AttnkitError(f"positions: expected [B={B}, S >= {int(self.seen.max())}], got {tuple(positions.shape)}")
        flat, allocated = self.flat_slots()
        pos = torch.where(allocated, self.pos_pool.view(-1)[flat], -1).view(B, -1)  # [B, Hkv * L]
        ok = pos >= 0
        new = positions.to(torch.int64).gather(1, pos.clamp_min(0))
        if bool((ok & (new < 0)).any()):
            raise AttnkitError("positions: a kept token was mapped to a negative position")
        self.pos_pool.view(-1)[flat.view(B, -1)[ok]] = new[ok]
        self.prefix = None
        self.seen = torch.where(ok, new, -1).amax(1).clamp_min(-1) + 1
        self._dirty[:] = True
        self._bounds_stale = True

    def _take_pages(self, n: int) -> torch.Tensor:
        if n > self.free_pages.numel():
            self._grow_pool(n)
        taken = self.free_pages[-n:].flip(0) if n else self.free_pages[:0]
        self.free_pages = self.free_pages[: self.free_pages.numel() - n]
        return taken

    # --- logical view --------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Logical slots per row (`maxp * page_size`)."""
        return self.page_table.shape[1] * self.page_size

    def flat_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(flat [R, L] int64 index into the flattened pools, allocated [R, L] bool)`."""
        pt = self.page_table.long()
        ps = self.page_size
        flat = (pt.clamp_min(0).unsqueeze(-1) * ps + torch.arange(ps, device=self.device)).reshape(self.rows, -1)
        allocated = (pt >= 0).repeat_interleave(ps, dim=1)
        return flat, allocated

    def logical(self) -> dict[str, torch.Tensor]:
        """Every logical slot of every row, shaped `[B, Hkv, L, ...]` (a gather, for reference paths).

        Keys: `k [B, Hkv, L, D]`, `v`, `pos [B, Hkv, L]` (-1 free), `bias`, `score`, `valid` bool."""
        flat, allocated = self.flat_slots()
        B, H = self.batch, self.num_heads
        pos = torch.where(allocated, self.pos_pool.view(-1)[flat], -1)
        out = {
            "k": self.k_pool.view(-1, self.head_dim)[flat].view(B, H, -1, self.head_dim),
            "v": self.v_pool.view(-1, self.head_dim_v)[flat].view(B, H, -1, self.head_dim_v),
            "pos": pos.view(B, H, -1),
            "bias": self.bias_pool.view(-1)[flat].view(B, H, -1),
            "score": self.score_pool.view(-1)[flat].view(B, H, -1),
        }
        out["valid"] = out["pos"] >= 0
        return out

    def kept(self, by_position: bool = True) -> dict[str, torch.Tensor]:
        """Kept tokens packed to the left: `[B, Hkv, N, ...]` with N the largest kept count, padded
        (`pos = -1`, `valid = False`); `slot` gives each entry's logical slot. Sorted by position
        by default."""
        lg = self.logical()
        L = lg["pos"].shape[-1]
        idx = torch.arange(L, device=self.device)
        key = lg["pos"] if by_position else idx.expand_as(lg["pos"])
        big = torch.iinfo(torch.int64).max
        order = torch.where(lg["valid"], key, big).argsort(dim=-1, stable=True)
        n = int(lg["valid"].sum(-1).max()) if L else 0
        order = order[..., :n]
        out = {name: t.gather(2, order.unsqueeze(-1).expand(*order.shape, t.shape[-1])) if t.dim() == 4
               else t.gather(2, order) for name, t in lg.items()}
        out["slot"] = torch.where(out["valid"], order, -1)
        return out

    def num_kept(self) -> torch.Tensor:
        """Tokens kept per row: `[B, Hkv]` int64."""
        return self.logical()["valid"].sum(-1)

    # --- append / evict ------------------------------------------------------------------------

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append `k [B, Tn, Hkv, D]`, `v [B, Tn, Hkv, Dv]` to every row (or only the rows where
        `rows [B, Hkv]` is True); free slots are filled first, then new pages. `positions` `[B, Tn]`
        or `[B, Hkv, Tn]` default to the next positions of each sequence; `bias [B, Hkv, Tn]` sets
        log-weights. Returns the logical slots written `[B, Hkv, Tn]` (-1 for rows left out)."""
        B, H, D, Dv = self.batch, self.num_heads, self.head_dim, self.head_dim_v
        if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (H, D):
            raise AttnkitError(f"k: expected [B={B}, Tn, Hkv={H}, D={D}], got "
                               f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
        Tn = k.shape[1]
        if not isinstance(v, torch.Tensor) or v.shape != (B, Tn, H, Dv):
            raise AttnkitError(f"v: expected [B={B}, Tn={Tn}, Hkv={H}, Dv={Dv}], got "
                               f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise AttnkitError(f"k: expected dtype {self.dtype} (the cache's), got k {k.dtype}, v {v.dtype}")
        default_rows = rows is None and positions is None  # positions seen + 0..Tn-1 in every row
        if positions is None:
            positions = self.seen.view(B, 1) + torch.arange(Tn, device=self.device)
        if positions.shape == (B, Tn):
            positions = positions.unsqueeze(1).expand(B, H, Tn)
        elif positions.shape != (B, H, Tn):
            raise AttnkitError(f"positions: expected [B={B}, Tn={Tn}] or [B, Hkv={H}, Tn], got {tuple(positions.shape)}")
        if bias is not None and bias.shape != (B, H, Tn):
            raise AttnkitError(f"bias: expected [B={B}, Hkv={H}, Tn={Tn}], got {tuple(bias.shape)}")
        if rows is None:
            rows = torch.ones(B, H, dtype=torch.bool, device=self.device)
        elif rows.shape != (B, H) or rows.dtype != torch.bool:
            raise AttnkitError(f"rows: expected bool [B={B}, Hkv={H}], got {rows.dtype} {tuple(rows.shape)}")
        if Tn == 0:
            return torch.empty(B, H, 0, dtype=torch.int64, device=self.device)
        self.appended += Tn
        if self.prefix is not None:
            self.prefix = self.prefix + Tn if default_rows else None
        ps, R = self.page_size, self.rows
        take_row = rows.reshape(R)
        flat, allocated = self.flat_slots()
        free_slot = allocated & (self.pos_pool.view(-1)[flat] < 0)
        need = torch.where(take_row, (Tn - free_slot.sum(1)).clamp_min(0), 0)
        new_pages = -(-need // ps)  # [R]
        total = int(new_pages.sum())
        if total:
            ids = self._take_pages(total)
            empty = self.page_table < 0
            short = int((new_pages - empty.sum(1)).max())
            if short > 0:
                pad = torch.full((R, short), -1, dtype=torch.int32, device=self.device)
                self.page_table = torch.cat([self.page_table, pad], 1)
                empty = self.page_table < 0
            take = empty & (empty.long().cumsum(1) - 1 < new_pages.unsqueeze(1))
            self.page_table[take] = ids.to(torch.int32)
            self.pos_pool[ids] = -1
            flat, allocated = self.flat_slots()
            free_slot = allocated & (self.pos_pool.view(-1)[flat] < 0)
        rank = free_slot.long().cumsum(1) - 1
        chosen = free_slot & (rank < Tn) & take_row.unsqueeze(1)  # exactly Tn per chosen row
        dst = flat[chosen]  # row-major: row r's Tn slots in logical order
        row = torch.arange(R, device=self.device).unsqueeze(1).expand_as(chosen)[chosen]
        tok = rank[chosen]
        kr = k.permute(0, 2, 1, 3).reshape(R, Tn, D)
        vr = v.permute(0, 2, 1, 3).reshape(R, Tn, Dv)
        self.k_pool.view(-1, D)[dst] = kr[row, tok]
        self.v_pool.view(-1, Dv)[dst] = vr[row, tok]
        self.pos_pool.view(-1)[dst] = positions.to(torch.int64).reshape(R, Tn)[row, tok]
        self.bias_pool.view(-1)[dst] = 0.0 if bias is None else bias.reshape(R, Tn)[row, tok].to(self.bias_pool.dtype)
        self.score_pool.view(-1)[dst] = 0.0
        self._dirty[dst // ps] = True
        self._bounds_stale = True
        newest = torch.where(rows.unsqueeze(-1), positions.to(torch.int64), -1).amax((1, 2)) + 1
        self.seen = torch.maximum(self.seen, newest)
        out = torch.full((R, Tn), -1, dtype=torch.int64, device=self.device)
        out[row, tok] = torch.arange(self.capacity, device=self.device).expand(R, -1)[chosen]
        return out.view(B, H, Tn)

    def evict(self, slots: torch.Tensor) -> None:
        """Free the logical slots `slots [B, Hkv, M]` (-1 entries ignored); pages left empty return
        to the pool. Nothing else moves."""
        B, H = self.batch, self.num_heads
        if slots.dim() != 3 or slots.shape[:2] != (B, H):
            raise AttnkitError(f"slots: expected [B={B}, Hkv={H}, M], got {tuple(slots.shape)}")
        if slots.numel() == 0:
            return
        top = int(slots.max())
        if top >= self.capacity:
            raise AttnkitError(f"slots: expected logical slots < capacity {self.capacity}, got {top}")
        if top >= 0:
            self.prefix = None
        flat, allocated = self.flat_slots()
        s = slots.reshape(self.rows, -1).long()
        ok = s >= 0
        sel = flat.gather(1, s.clamp_min(0))[ok & allocated.gather(1, s.clamp_min(0))]
        self.pos_pool.view(-1)[sel] = -1
        self.bias_pool.view(-1)[sel] = 0.0
        self.score_pool.view(-1)[sel] = 0.0
        self._dirty[sel // self.page_size] = True
        self._bounds_stale = True
        self._release_empty_pages()

    def retain(self, slots: torch.Tensor) -> None:
        """Keep only the logical slots `slots [B, Hkv, K]` (-1 padded) of each row; free the rest."""
        lg_valid = self.logical()["valid"].reshape(self.rows, -1)
        s = slots.reshape(self.rows, -1).long()
        # amax so that a -1 pad (mapped to slot 0) never clears a slot listed elsewhere in the row
        keep = torch.zeros(lg_valid.shape, dtype=torch.int8, device=self.device).scatter_reduce(
            1, s.clamp_min(0), (s >= 0).to(torch.int8), reduce="amax").bool()
        drop = lg_valid & ~keep
        L = drop.shape[1]
        ids = torch.where(drop, torch.arange(L, device=self.device), -1)
        self.evict(ids.view(self.batch, self.num_heads, L))

    def _release_empty_pages(self) -> None:
        pt = self.page_table.long()
        used = pt >= 0
        empty_page = (self.pos_pool < 0).all(1)  # [P]
        release = used & empty_page[pt.clamp_min(0)]
        if bool(release.any()):
            ids = pt[release]
            self.page_table[release] = -1
            self.free_pages = torch.cat([self.free_pages, ids])

    # --- metadata for sparse decoding ------------------------------------------------------------

    def page_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Element-wise min and max of the valid keys of every page: `[P, D]` each, in the key dtype
        (Quest; the min and max of a page's keys are keys' values, so nothing is rounded; `+inf` /
        `-inf` for a page without a valid key). Only pages written or evicted since the last call
        are recomputed."""
        self._refresh_page_stats()
        return self._kmin, self._kmax

    def page_newest(self) -> torch.Tensor:
        """The newest original position held by every page, `[P]` int64 (-1 = none): lets Quest
        always read the page of the tokens being decoded."""
        self._refresh_page_stats()
        return self._pmax

    def _alloc_bounds(self) -> None:
        """Per-page bounds for the whole pool, every page marked dirty."""
        P, D, dev = self.num_pages, self.head_dim, self.device
        self._kmin = torch.zeros(P, D, dtype=self.dtype, device=dev)
        self._kmax = torch.zeros(P, D, dtype=self.dtype, device=dev)
        self._pmax = torch.full((P,), -1, dtype=torch.int64, device=dev)
        self._dirty = torch.ones(P, dtype=torch.bool, device=dev)
        self._bounds_stale = True

    def _refresh_page_stats(self) -> None:
        if self._kmin is None or self._kmin.shape[0] != self.num_pages:  # first use, or the pool was compacted
            self._alloc_bounds()
        if not self._bounds_stale:  # host-side flag: no device sync on a decode step that changed nothing
            return
        self._bounds_stale = False
        dirty = self._dirty.nonzero().squeeze(1)
        if dirty.numel():
            k = self.k_pool[dirty]  # [n, ps, D]
            pos = self.pos_pool[dirty]
            valid = (pos >= 0).unsqueeze(-1)
            self._kmin[dirty] = torch.where(valid, k, float("inf")).amin(1)
            self._kmax[dirty] = torch.where(valid, k, float("-inf")).amax(1)
            self._pmax[dirty] = pos.amax(1)
            self._dirty[dirty] = False

    # --- memory accounting -----------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes: `kept` (keys + values of kept tokens), `pages` (keys + values of allocated pages),
        `metadata` (positions, weights, scores of allocated pages, page table), `reserved` (every
        pool tensor, free pages included)."""
        el = torch.empty((), dtype=self.dtype).element_size()
        per_tok = (self.head_dim + self.head_dim_v) * el
        allocated = int((self.page_table >= 0).sum())
        per_slot_meta = 8 + 4 + 4
        pools = [t for t in (self.k_pool, self.v_pool, self.pos_pool, self.bias_pool, self.score_pool, self._dirty,
                             self._kmin, self._kmax, self._pmax) if t is not None]
        return {
            "kept": int(self.num_kept().sum()) * per_tok,
            "pages": allocated * self.page_size * per_tok,
            "metadata": allocated * self.page_size * per_slot_meta + self.page_table.numel() * 4,
            "reserved": sum(t.numel() * t.element_size() for t in pools) + self.page_table.numel() * 4,
        }
