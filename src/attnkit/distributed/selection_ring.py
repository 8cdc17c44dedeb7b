"""Context parallelism for block-sparse selections (block top-k, MoBA, NSA's selected branch).

A block-level selection says, per query block and head, which key blocks are visible. Sharded
over ranks, a rank needs only the key blocks its own queries selected, so sending every KV
shard around the ring (as `ring_attention` does) wastes bandwidth. Here every rank first
all-gathers one bit per key block ("some query of mine selected it"); then, in rounds
t = 1 .. W-1, rank r sends rank (r + t) the blocks of its shard that rank needs and receives
from rank (r - t) the blocks it needs. A round in which no rank needs anything from the rank t
places before it is skipped by everyone (all ranks know the whole need matrix). The local
computation is one attention call of the local queries over the own shard plus the received
blocks, restricted by the selection (remapped to the held blocks) and by causality in global
positions. Key/value gradients of received blocks travel back to their owners the same way.

Bytes sent are exactly the selected blocks of other ranks (`CommStats`), and
`CommStats.skipped_steps` counts the skipped rounds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..core.contract import AttnkitError, validate_attention
from ..core.masks import Mask
from ..core.reference import blockwise_attention
from ..core.selection import KVSelection, cdiv
from .comm import Comm, CommStats, dtype_code, dtype_name
from .layout import check_layout, chunks_per_rank, positions, segments


def shard_selection(selection: KVSelection, world: int, rank: int, layout: str, local_len: int) -> KVSelection:
    """`rank`'s query rows of a global `selection` (global key block numbers kept), for shards
    made by `attnkit.distributed.shard`; each chunk must hold whole query blocks."""
    check_layout(layout)
    qb = selection.q_block
    rows = []
    for seg in segments(layout, world, rank, local_len):
        if seg.length % qb or seg.start % qb:
            raise AttnkitError(f"selection.q_block: each chunk of {seg.length} tokens must hold whole query blocks "
                               f"of {qb}")
        rows.append(selection.indices[:, :, seg.start // qb:(seg.start + seg.length) // qb])
    return KVSelection(torch.cat(rows, 2), selection.q_block, selection.k_block)


class _Plan:
    """Who needs which key blocks, and where each block lives; the same on every rank."""

    def __init__(self, need: torch.Tensor, world: int, layout: str, local_len: int, k_block: int) -> None:
        self.need = need  # [W, Nk] bool: rank r's queries selected key block b
        self.world, self.k_block = world, k_block
        nk = need.shape[1]
        self.owner = torch.empty(nk, dtype=torch.int64)
        self.first_row = torch.empty(nk, dtype=torch.int64)  # local row of the block's first key
        for r in range(world):
            for seg in segments(layout, world, r, local_len):
                blocks = torch.arange(seg.start // k_block, seg.stop // k_block)
                self.owner[blocks] = r
                self.first_row[blocks] = seg.offset + (blocks * k_block - seg.start)

    def blocks(self, owner: int, reader: int) -> torch.Tensor:
        """Key blocks of `owner`'s shard that `reader` needs (sorted)."""
        return torch.nonzero(self.need[reader] & (self.owner == owner)).flatten()

    def rows(self, blocks: torch.Tensor) -> torch.Tensor:
        """Local rows (in the owner's shard) of the given blocks, block after block."""
        return (self.first_row[blocks].view(-1, 1) + torch.arange(self.k_block).view(1, -1)).flatten()

    def active_rounds(self) -> list[int]:
        W = self.world
        return [t for t in range(1, W) if any(self.blocks(r, (r + t) % W).numel() for r in range(W))]


class _FetchBlocks(torch.autograd.Function):
    """`(k, v)` of this rank -> the held keys: the own shard followed by the received blocks.
    Backward sends the received blocks' gradients home and adds those coming back to the own shard."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor, comm: Comm, plan: _Plan, rounds: list[int],
                stats: Optional[CommStats]):
        r, W = comm.rank, comm.world
        ks, vs = [k], [v]
        for t in rounds:
            dst, src = (r + t) % W, (r - t) % W
            send_rows, recv_n = plan.rows(plan.blocks(r, dst)), plan.blocks(src, r).numel() * plan.k_block
            sends = [(x.index_select(1, send_rows.to(x.device)), dst) for x in (k, v)] if send_rows.numel() else []
            recvs = [((x.shape[0], recv_n) + tuple(x.shape[2:]), x.dtype, x.device, src) for x in (k, v)] \
                if recv_n else []
            got = comm.exchange(sends, recvs, stats, "forward").wait()
            if recv_n:
                ks.append(got[0])
                vs.append(got[1])
        ctx.comm, ctx.plan, ctx.rounds, ctx.stats, ctx.shape = comm, plan, rounds, stats, (k.shape, v.shape)
        return torch.cat(ks, 1), torch.cat(vs, 1)

    @staticmethod
    def backward(ctx, gk: torch.Tensor, gv: torch.Tensor):
        comm, plan = ctx.comm, ctx.plan
        r, W = comm.rank, comm.world
        (k_shape, v_shape) = ctx.shape
        T = k_shape[1]
        cd = torch.float64 if gk.dtype == torch.float64 else torch.float32
        dk, dv = gk[:, :T].to(cd), gv[:, :T].to(cd)
        at = T
        for t in ctx.rounds:
            dst, src = (r + t) % W, (r - t) % W
            n_back = plan.blocks(src, r).numel() * plan.k_block  # gradients of what src sent us go back
            mine_rows = plan.rows(plan.blocks(r, dst))  # what we sent dst comes back as gradients
            sends = [(g[:, at:at + n_back].to(cd), src) for g in (gk, gv)] if n_back else []
            recvs = [((gk.shape[0], mine_rows.numel()) + tuple(s[2:]), cd, gk.device, dst) for s in (k_shape, v_shape)] \
                if mine_rows.numel() else []
            got = comm.exchange(sends, recvs, ctx.stats, "backward").wait()
            at += n_back
            if mine_rows.numel():
                rows = mine_rows.to(gk.device)
                dk = dk.index_add(1, rows, got[0])
                dv = dv.index_add(1, rows, got[1])
        return dk.to(gk.dtype), dv.to(gv.dtype), None, None, None, None


def selection_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: KVSelection,
    group: Optional[dist.ProcessGroup] = None,
    causal: bool = True,
    layout: str = "zigzag",
    scale: Optional[float] = None,
    *,
    stats: Optional[CommStats] = None,
) -> torch.Tensor:
    """Attention of a sharded sequence restricted to a block-level `selection`, moving only the
    selected key blocks.

    `q: [B, T, Hq, D]`, `k`, `v: [B, T, Hkv, D*]`: this rank's shards (`attnkit.distributed.shard`);
    `selection`: this rank's query rows of the global selection (`shard_selection`), key blocks
    numbered globally; `k_block` and `q_block` must divide the layout's chunk length. Equals the
    single-process `attention(..., selection=global_selection)` on this rank's rows (a selection
    method's output when its selection is passed). Gathers the selected blocks at once: memory is
    the own shard plus the selected remote blocks."""
    comm = Comm(group, "selection_ring_attention")
    problem, sig = None, [-1] * 9
    try:
        check_layout(layout)
        call = validate_attention(q, k, v, causal=causal, scale=scale)
        if call.tq != call.tk:
            raise AttnkitError(f"k: expected a key shard as long as the query shard ({call.tq}), got {call.tk}")
        per = chunks_per_rank(layout)
        chunk = call.tq // per
        if call.tq % per or chunk % selection.k_block or chunk % selection.q_block:
            raise AttnkitError(f"selection.k_block: the layout's chunks ({call.tq} local tokens, layout {layout!r}) "
                               f"must hold whole query and key blocks (q_block {selection.q_block}, k_block "
                               f"{selection.k_block})")
        selection.validate(call.batch, call.hq, call.hkv, call.tq, comm.world * call.tq)
        sig = [call.batch, call.tq, call.hq, call.hkv, call.head_dim, call.head_dim_v, dtype_code(call.dtype),
               selection.q_block, selection.k_block]
    except AttnkitError as e:
        problem = str(e)
    comm.agree(problem, sig, lambda s: (f"q [B={s[0]}, T={s[1]}, Hq={s[2]}, D={s[4]}], k/v Hkv={s[3]}, Dv={s[5]}, "
                                        f"dtype {dtype_name(s[6])}, q_block={s[7]}, k_block={s[8]}"))
    W, r, T, kb = comm.world, comm.rank, q.shape[1], selection.k_block
    nk = cdiv(W * T, kb)
    idx = selection.indices
    mine = torch.zeros(nk + 1, dtype=torch.bool, device=idx.device)
    mine[torch.where(idx >= 0, idx.long(), torch.full_like(idx, nk, dtype=torch.long)).flatten()] = True
    need = torch.stack([x.cpu() for x in comm.all_gather(mine[:nk].to(torch.uint8))]).bool()
    plan = _Plan(need, W, layout, T, kb)
    rounds = plan.active_rounds()
    if stats is not None:
        stats.steps, stats.skipped_steps, stats.calls = 1 + len(rounds), W - 1 - len(rounds), 1
        stats.kernels = {"reference": "reference (selection and global-position mask)"}
    kc, vc = _FetchBlocks.apply(k.contiguous(), v.contiguous(), comm, plan, rounds, stats)
    # the held keys: own shard, then the received blocks in round order
    own_blocks = torch.nonzero(plan.owner == r).flatten()
    own_blocks = own_blocks[torch.argsort(plan.first_row[own_blocks])]  # in local row order
    held = [own_blocks] + [plan.blocks((r - t) % W, r) for t in rounds]
    held_blocks = torch.cat(held)
    to_held = torch.full((nk + 1,), -1, dtype=torch.long)
    to_held[held_blocks] = torch.arange(held_blocks.numel())
    sel = to_held.to(idx.device)[torch.where(idx >= 0, idx.long(), torch.full_like(idx, nk, dtype=torch.long))]
    local_sel = KVSelection(sel.to(torch.int32), selection.q_block, kb)
    q_glob = positions(layout, W, r, T, q.device)
    k_glob = (held_blocks.view(-1, 1) * kb + torch.arange(kb).view(1, -1)).flatten().to(q.device)
    shift = kc.shape[1] - T  # bottom-right alignment of the local query positions

    def visible(b: torch.Tensor, h: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        return k_glob[kp] <= q_glob[qp - shift]

    mask = Mask(visible, "global causal") if causal else None
    out, _ = blockwise_attention(q, kc, vc, causal=False, scale=scale, mask=mask, selection=local_sel)
    return out
