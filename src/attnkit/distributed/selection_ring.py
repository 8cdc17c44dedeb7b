"""Context parallelism for block-sparse selections (block top-k, MoBA, NSA's selected branch).

A block-level selection says, per query block and head, which key blocks are visible. Sharded
over ranks, a rank needs only the key blocks its own queries selected, so sending every KV
shard around the ring (as `ring_attention` does) wastes bandwidth. Here every rank first
all-gathers one bit per key block ("some query of mine selected it"); then, in rounds
t = 1 .. W-1, rank r sends rank (r + t) the blocks of its shard that rank needs and receives
from rank (r - t) the blocks it needs. A round in which no rank needs anything from the rank t
places before it is skipped by everyone (all ranks know the whole need matrix). The local
computation attends the local queries over the own shard plus the received blocks, restricted
by the selection (remapped to the held blocks) and by causality in global positions, as at most
two calls of the sparse executor (`ops.sparse`, whose dispatcher picks Triton, FlexAttention or
the reference): the selected blocks wholly in a query block's past (no mask) and, when causal,
the blocks on its diagonal (causal within the query's own chunk), merged by LSE
(`blocks.merge`). Key/value gradients of received blocks travel back to their owners the same way.

Bytes sent are exactly the selected blocks of other ranks (`CommStats`), and
`CommStats.skipped_steps` counts the skipped rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ..core.contract import AttnkitError, validate_attention
from ..core.selection import KVSelection, cdiv
from ..ops.dispatch import Explanation
from .blocks import merge
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
    backend: str = "auto",
    stats: Optional[CommStats] = None,
) -> torch.Tensor:
    """Attention of a sharded sequence restricted to a block-level `selection`, moving only the
    selected key blocks.

    `q: [B, T, Hq, D]`, `k`, `v: [B, T, Hkv, D*]`: this rank's shards (`attnkit.distributed.shard`);
    `selection`: this rank's query rows of the global selection (`shard_selection`), key blocks
    numbered globally; `k_block` and `q_block` must divide the layout's chunk length. Equals the
    single-process `attention(..., selection=global_selection)` on this rank's rows (a selection
    method's output when its selection is passed). Gathers the selected blocks at once: memory is
    the own shard plus the selected remote blocks.

    `backend` is the sparse executor's (`ops.sparse_attention`: "auto", "triton", "flex",
    "reference"), used for both local calls; `stats.kernels` names what ran for each piece and
    why the backends before it were passed over."""
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
    kc, vc = _FetchBlocks.apply(k.contiguous(), v.contiguous(), comm, plan, rounds, stats)
    # the held keys: own shard, then the received blocks in round order
    own_blocks = torch.nonzero(plan.owner == r).flatten()
    own_blocks = own_blocks[torch.argsort(plan.first_row[own_blocks])]  # in local row order
    held_blocks = torch.cat([own_blocks] + [plan.blocks((r - t) % W, r) for t in rounds])
    pieces = _LocalPieces(selection, W, r, layout, T, held_blocks, causal)
    out, used = pieces.run(q, kc, vc, scale, backend)
    if stats is not None:
        stats.steps, stats.skipped_steps, stats.calls = 1 + len(rounds), W - 1 - len(rounds), len(used)
        stats.kernels = _describe(used)
    return out


class _LocalPieces:
    """The local attention of one rank split into calls of the sparse executor that need no mask
    beyond its own causal rule, so the dispatcher can put them on its fast kernels:

    - `past`: for each query block, its selected key blocks that lie wholly at or before the
      block's first query in global positions (all of them when not causal), remapped to the held
      keys; non-causal, no mask;
    - `diagonal` (causal only): the selected key blocks that overlap the query block's own
      positions. Chunks hold whole query and key blocks, so these lie in the query's own chunk of
      the own shard: each chunk's queries attend to the same chunk's keys, causal with Tq == Tk
      (chunks stacked along the batch).

    Selected blocks wholly after the query block are invisible and dropped. The two results are
    merged by LSE in float32/64 (`blocks.merge`), whose backward hands each call its share, so
    each call keeps its own executor's backward."""

    def __init__(self, selection: KVSelection, world: int, rank: int, layout: str, local_len: int,
                 held_blocks: torch.Tensor, causal: bool) -> None:
        qb, kb, idx = selection.q_block, selection.k_block, selection.indices
        dev = idx.device
        self.qb, self.kb, self.T = qb, kb, local_len
        self.segs = segments(layout, world, rank, local_len)
        self.chunk = local_len // len(self.segs)
        nk = cdiv(world * local_len, kb)
        to_held = torch.full((nk + 1,), -1, dtype=torch.long)
        to_held[held_blocks] = torch.arange(held_blocks.numel())
        to_held = to_held.to(dev)
        gb = idx.long()
        valid = gb >= 0
        gb_safe = torch.where(valid, gb, torch.full_like(gb, nk))
        q_first = positions(layout, world, rank, local_len, dev)[::qb].view(1, 1, -1, 1)  # first query per block
        if causal:
            past = valid & ((gb + 1) * kb - 1 <= q_first)
            diag = valid & ~past & (gb * kb <= q_first + qb - 1)
        else:
            past, diag = valid, torch.zeros_like(valid)
        self.past = _compact(to_held[gb_safe], past)
        self.diagonal = None
        if causal and bool(diag.any()):
            per_chunk = self.chunk // qb
            chunk_of_row = torch.arange(idx.shape[2], device=dev) // per_chunk
            first_block = torch.tensor([sg.start // kb for sg in self.segs], device=dev)[chunk_of_row]
            local = _compact(gb - first_block.view(1, 1, -1, 1), diag)  # [B, Hsel, Nq, S'] chunk-local
            B, H, _, S = local.shape
            self.diagonal = local.view(B, H, len(self.segs), per_chunk, S).transpose(1, 2).reshape(
                B * len(self.segs), H, per_chunk, S)
        self.has_past = bool(past.any())

    def calls(self, q: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
              scale: Optional[float], backend: str):
        """`(piece name, chosen backend, Explanation, call, opts, unstack)` for each call to make;
        `k_own`, `v_own`: the own shard (the first rows of the held `kc`, `vc`)."""
        from ..ops import sparse as sparse_op

        out = []
        if self.has_past or self.diagonal is None:
            sel = KVSelection(self.past.to(torch.int32), self.qb, self.kb, trusted=True)
            chosen, exp, call, opts = sparse_op.plan(q, kc, vc, sel, causal=False, scale=scale, return_lse=True,
                                                     backend=backend)
            out.append(("past blocks", chosen, exp, call, opts, None))
        if self.diagonal is not None:
            B, T, n = q.shape[0], self.T, len(self.segs)
            stack = lambda x: x.reshape(B * n, self.chunk, *x.shape[2:])  # noqa: E731  chunks along the batch
            sel = KVSelection(self.diagonal.to(torch.int32), self.qb, self.kb, trusted=True)
            chosen, exp, call, opts = sparse_op.plan(stack(q), stack(k_own), stack(v_own), sel, causal=True,
                                                     scale=scale, return_lse=True, backend=backend)

            def unstack(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                H = lse.shape[1]
                return o.reshape(B, T, *o.shape[2:]), lse.view(B, n, H, self.chunk).transpose(1, 2).reshape(B, H, T)

            out.append(("diagonal blocks (causal)", chosen, exp, call, opts, unstack))
        return out

    def run(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scale: Optional[float],
            backend: str) -> tuple[torch.Tensor, list[tuple[str, Explanation]]]:
        parts, used = [], []
        T = self.T
        for name, chosen, exp, call, opts, unstack in self.calls(q, kc[:, :T], vc[:, :T], kc, vc, scale, backend):
            o, lse = chosen.run(call, opts)
            parts.append(unstack(o, lse) if unstack is not None else (o, lse))
            used.append((name, exp))
        if len(parts) == 1:
            return parts[0][0], used
        out, _ = merge(parts)
        return out.to(q.dtype), used


def _compact(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`values` where `keep`, else -1, kept entries first along the last dim, as narrow as the
    widest row allows (at least 1)."""
    big = torch.iinfo(torch.int64).max
    order = torch.where(keep, values.long(), torch.full_like(values, big, dtype=torch.long)).sort(-1).values
    width = max(int(keep.sum(-1).max()) if keep.numel() else 0, 1)
    order = order[..., :width]
    return torch.where(order == big, torch.full_like(order, -1), order)


def _describe(used: list[tuple[str, Explanation]]) -> dict[str, str]:
    """`CommStats.kernels`: each backend that ran, with the pieces it ran and the reasons the
    backends before it in the dispatcher's order were passed over."""
    out: dict[str, list[str]] = {}
    for name, exp in used:
        names = [row[0] for row in exp.rows]
        skipped = "; ".join(f"{n}: {why}" for n, _, why in exp.rows[:names.index(exp.chosen)])
        out.setdefault(exp.chosen, []).append(f"{name} via ops.sparse_attention" + (f" ({skipped})" if skipped else ""))
    return {k: ", ".join(v) for k, v in out.items()}


@dataclass
class SelectionRingExplanation:
    """What `selection_ring_attention` will run on one rank: its local calls and their kernels."""

    world: int
    rank: int
    held_blocks: int = 0  # key blocks attended: the own shard's plus the selected remote ones
    received_bytes: int = 0  # forward bytes of the selected remote blocks this rank receives
    kernels: dict[str, str] = field(default_factory=dict)  # kernel -> the calls it runs, and why
    explanations: list[tuple[str, Explanation]] = field(default_factory=list)  # the dispatcher's, per call

    def __str__(self) -> str:
        ks = "; ".join(f"{k}: {why}" for k, why in self.kernels.items())
        return (f"selection ring on rank {self.rank}/{self.world}: {len(self.explanations)} local call(s) over "
                f"{self.held_blocks} key blocks, kernels [{ks}], receives {self.received_bytes} B forward")


def explain_selection_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: KVSelection, world: int,
                           rank: int = 0, causal: bool = True, layout: str = "zigzag", scale: Optional[float] = None,
                           backend: str = "auto") -> SelectionRingExplanation:
    """For this rank's shards and its rows of the selection (`shard_selection`), say which
    kernels `selection_ring_attention` with the same arguments would run for its local calls,
    and what it receives; needs no process group (only this rank's own selection)."""
    check_layout(layout)
    T, kb = q.shape[1], selection.k_block
    nk = cdiv(world * T, kb)
    idx = selection.indices
    wanted = torch.zeros(nk + 1, dtype=torch.bool)
    wanted[torch.where(idx >= 0, idx.long(), torch.full_like(idx, nk, dtype=torch.long)).flatten().cpu()] = True
    own = torch.zeros(nk, dtype=torch.bool)
    for seg in segments(layout, world, rank, T):
        own[seg.start // kb:seg.stop // kb] = True
    remote = torch.nonzero(wanted[:nk] & ~own).flatten()
    held = torch.cat([torch.nonzero(own).flatten(), remote])
    n = held.numel() * kb
    kc, vc = (x[:, :1].expand(x.shape[0], n, *x.shape[2:]) for x in (k, v))  # shapes only: nothing is computed
    pieces = _LocalPieces(selection, world, rank, layout, T, held, causal)
    out = SelectionRingExplanation(world, rank, held_blocks=held.numel())
    out.received_bytes = remote.numel() * kb * k.shape[0] * k.shape[2] * (k.shape[3] + v.shape[3]) * k.element_size()
    out.explanations = [(name, exp) for name, _, exp, _, _, _ in pieces.calls(q, k, v, kc, vc, scale, backend)]
    out.kernels = _describe(out.explanations)
    return out
