"""`KVSelection`: which keys each query may see, shared by every sparse method.

See docs/design.md "A sparse method is a selection plus an executor".

`indices: int32 [B, Hsel, Nq, S]`, padded with -1, rows free of duplicates. Row n lists the key
blocks (`k_block` keys each) visible to query block n (`q_block` queries each, counted in query
coordinates: query i of Tq is in block i // q_block). `q_block == 1` is per-token selection (MoBA,
NSA, DSA); `k_block == 1` is token-level keys (DSA). `Hsel` is Hq (per query head), Hkv (shared by
the query heads of a KV group) or 1 (shared by all heads). With `causal=True` the causal rule still
applies token by token inside selected blocks.

Under varlen (`cu_seqlens`, B == 1) the selection's batch dim is the number of sequences N and
block numbers are local to each sequence (block 0 starts at the sequence's first token), so a
packed run equals per-sequence runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .contract import AttnkitError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVSelection:
    indices: torch.Tensor  # int32 [B, Hsel, Nq, S], -1 padded
    q_block: int = 1
    k_block: int = 1
    # True when the indices are in range and rows free of duplicates by construction (a selection
    # attnkit's own code built at decode): `validate` then checks shapes only, without reading the
    # indices back (a host sync per call, and not allowed while a CUDA graph is being captured)
    trusted: bool = field(default=False, compare=False, repr=False)

    @property
    def num_heads(self) -> int:
        return self.indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.indices.shape[2]

    @property
    def width(self) -> int:
        return self.indices.shape[3]

    def density(self, tq: int, tk: int, *, causal: bool = True, cu_seqlens: Optional[torch.Tensor] = None) -> float:
        """Fraction of the causally visible (query, key) pairs the selection visits, averaged over
        heads; `tq`, `tk` are the query and key lengths (under varlen `cu_seqlens` gives them per
        sequence). 1.0 for a selection of every block; O(Tq * S) work."""
        dev = self.indices.device
        if cu_seqlens is not None:
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            lens = cu[1:] - cu[:-1]
            longest = int(lens.max())
            self.validate(lens.numel(), self.num_heads, self.num_heads, longest, longest)
            visited, pairs = _visible_counts(self, longest, lens, lens, 0, causal)
        else:
            B = self.indices.shape[0]
            self.validate(B, self.num_heads, self.num_heads, tq, tk)
            lens_k = torch.full((B,), tk, dtype=torch.int64, device=dev)
            lens_q = torch.full((B,), tq, dtype=torch.int64, device=dev)
            visited, pairs = _visible_counts(self, tq, lens_k, lens_q, tk - tq, causal)
        return float(visited / pairs) if float(pairs) > 0 else 0.0

    def to_string(self, batch: int = 0, head: int = 0, max_rows: int = 32, max_cols: int = 64) -> str:
        """A picture of one (batch, head)'s block selection: a row per query block, a column per key
        block, `#` selected, `.` not (the causal rule is not drawn); large selections are cut."""
        B, H, nq, S = self.indices.shape
        idx = self.indices[batch, head].to("cpu", torch.int64)  # [Nq, S]
        nk = int(idx.max()) + 1 if idx.numel() and int(idx.max()) >= 0 else 0
        rows, cols = min(nq, max_rows), min(nk, max_cols)
        head_line = (f"KVSelection(B={B}, Hsel={H}, Nq={nq}, S={S}, q_block={self.q_block}, "
                     f"k_block={self.k_block}): batch {batch}, head {head}, key blocks 0..{max(nk - 1, 0)}")
        lines = [head_line]
        if rows and cols:
            grid = torch.zeros(rows, cols + 1, dtype=torch.bool)
            part = idx[:rows]
            grid.scatter_(1, torch.where((part < 0) | (part >= cols), cols, part), True)
            for r in range(rows):
                lines.append("".join("#" if v else "." for v in grid[r, :cols].tolist()) + (" ..." if nk > cols else ""))
        if nq > rows:
            lines.append(f"... ({nq - rows} more query blocks)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()

    def head_map(self, hq: int, hkv: int) -> torch.Tensor:
        """Selection head serving each query head: `[Hq]` int64."""
        h = torch.arange(hq)
        hs = self.num_heads
        if hs == hq:
            return h
        if hs == hkv:
            return h // (hq // hkv)
        return torch.zeros_like(h)

    def validate(self, batch: int, hq: int, hkv: int, tq: int, tk: int, check_rows: bool = True) -> "KVSelection":
        """Check shapes and ranges against an attention call (`tq`, `tk` per sequence: the longest
        sequence under varlen); raise AttnkitError naming `selection`."""
        idx = self.indices
        for name, val in (("q_block", self.q_block), ("k_block", self.k_block)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise AttnkitError(f"selection.{name}: expected an int >= 1, got {val!r}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 4:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise AttnkitError(f"selection.indices: expected an int tensor [B, Hsel, Nq, S], got {shape}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise AttnkitError(f"selection.indices: expected dtype int32, got {idx.dtype}")
        nq, nk = cdiv(tq, self.q_block), cdiv(tk, self.k_block)
        if idx.shape[0] != batch:
            raise AttnkitError(f"selection.indices: expected batch {batch}, got shape {tuple(idx.shape)}")
        if idx.shape[1] not in (hq, hkv, 1):
            raise AttnkitError(
                f"selection.indices: expected Hsel in (Hq={hq}, Hkv={hkv}, 1), got shape {tuple(idx.shape)}"
            )
        if idx.shape[2] != nq:
            raise AttnkitError(
                f"selection.indices: expected Nq = ceil({tq} / q_block {self.q_block}) = {nq} query blocks, "
                f"got shape {tuple(idx.shape)}"
            )
        if self.trusted:
            return self
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= nk):
            raise AttnkitError(
                f"selection.indices: expected key-block ids in [-1, {nk}) (ceil({tk} / k_block {self.k_block})), "
                f"got range [{int(idx.min())}, {int(idx.max())}]"
            )
        if check_rows and idx.shape[3] > 1:
            s = idx.sort(dim=-1).values
            dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
            if bool(dup.any()):
                where = [int(x) for x in dup.nonzero()[0][:3]]
                raise AttnkitError(f"selection.indices: expected rows free of duplicates, row {where} repeats a block")
        return self

    def to_dense_blocks(self, num_k_blocks: int) -> torch.Tensor:
        """`[B, Hsel, Nq, Nk]` booleans: block-level visibility (O(Nq * Nk), for tests and plots)."""
        idx = self.indices.long()
        out = torch.zeros(*idx.shape[:3], num_k_blocks + 1, dtype=torch.bool, device=idx.device)
        out.scatter_(-1, torch.where(idx < 0, num_k_blocks, idx), True)
        return out[..., :num_k_blocks]

    def to_dense_mask(self, hq: int, hkv: int, tq: int, tk: int) -> torch.Tensor:
        """`[B, Hq, Tq, Tk]` booleans (no causal rule applied). O(T^2): tests only."""
        blocks = self.to_dense_blocks(cdiv(tk, self.k_block))[:, self.head_map(hq, hkv).to(self.indices.device)]
        qb = torch.arange(tq, device=blocks.device) // self.q_block
        kb = torch.arange(tk, device=blocks.device) // self.k_block
        return blocks[:, :, qb][..., kb]

    @staticmethod
    def from_dense_blocks(blocks: torch.Tensor, q_block: int, k_block: int) -> "KVSelection":
        """From `[B, Hsel, Nq, Nk]` booleans; rows padded with -1 to the widest row."""
        if blocks.dim() != 4 or blocks.dtype != torch.bool:
            raise AttnkitError(f"blocks: expected bool [B, Hsel, Nq, Nk], got {blocks.dtype} {tuple(blocks.shape)}")
        width = max(int(blocks.sum(-1).max()) if blocks.numel() else 0, 1)
        nk = blocks.shape[-1]
        ids = torch.arange(nk, device=blocks.device).expand_as(blocks)
        # selected ids first (ascending), then padding: sort keys put unselected at the end
        key = torch.where(blocks, ids, ids + nk)
        order = key.sort(dim=-1).values[..., :width]
        idx = torch.where(order < nk, order, torch.full_like(order, -1))
        return KVSelection(idx.to(torch.int32).contiguous(), q_block, k_block)


def _visible_counts(selection: KVSelection, tq: int, k_len: torch.Tensor, q_len: torch.Tensor, offset: int,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(visited, causal_pairs)` float64 sums over the selection's batch, heads and queries.

    Query row i of sequence n (i < q_len[n]) sits at key position i + offset; keys are < k_len[n]."""
    idx = selection.indices.to(torch.int64)  # [N, H, Nq, S]
    N, H = idx.shape[:2]
    dev = idx.device
    kb, qb = selection.k_block, selection.q_block
    visited = torch.zeros((), dtype=torch.float64, device=dev)
    pairs = torch.zeros((), dtype=torch.float64, device=dev)
    chunk = max(1, (1 << 22) // max(1, N * H * max(1, idx.shape[-1])))
    klen = k_len.view(N, 1, 1, 1)
    for i0 in range(0, tq, chunk):
        i = torch.arange(i0, min(i0 + chunk, tq), device=dev)
        q_ok = (i.view(1, -1) < q_len.view(-1, 1)).view(N, 1, -1, 1)  # [N, 1, C, 1]
        p = (i + offset).view(1, 1, -1, 1)
        m = idx[:, :, i // qb]  # [N, H, C, S]
        end = torch.minimum((m + 1) * kb, klen)
        if causal:
            end = torch.minimum(end, p + 1)
        n_vis = (end - m * kb).clamp_min(0) * (m >= 0)
        visited += (n_vis * q_ok).sum(dtype=torch.float64)
        reach = torch.minimum(p + 1, klen) if causal else klen.expand(N, 1, p.shape[2], 1)
        pairs += (reach.clamp_min(0) * q_ok).sum(dtype=torch.float64) * H
    return visited, pairs
