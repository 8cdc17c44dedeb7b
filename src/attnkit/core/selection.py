"""`KVSelection`: which keys each query may see (DESIGN.md section 4), shared by every sparse method.

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

from dataclasses import dataclass

import torch

from .contract import AttnkitError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVSelection:
    indices: torch.Tensor  # int32 [B, Hsel, Nq, S], -1 padded
    q_block: int = 1
    k_block: int = 1

    @property
    def num_heads(self) -> int:
        return self.indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.indices.shape[2]

    @property
    def width(self) -> int:
        return self.indices.shape[3]

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
