"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al., 2023) over torch.distributed.

Each rank holds a sequence shard with all heads. One all-to-all turns that into the whole
sequence with `H / W` heads; any attnkit method then runs locally, unchanged, through
`attnkit.attention(..., method=..., **options)`; a second all-to-all turns heads back into
sequence shards. Communication per rank is O(T * H * D / W) regardless of W, but the head count
caps the group size: with fewer heads than ranks use `hybrid_attention` (Ulysses x ring).

GQA: key/value heads are split like query heads when `Hkv % W == 0`; when `W % Hkv == 0` each
KV head is repeated `W / Hkv` times first, so each rank receives the one KV head its query heads
share (gradients of the copies are summed by autograd).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from ..core.contract import AttnkitError, check_tensor
from .comm import Comm, CommStats, dtype_code, dtype_name
from .layout import check_layout, chunks_per_rank, positions

# methods whose pattern depends on the absolute head index: each rank would see local indices
HEAD_INDEXED_METHODS = ("strided",)
OPTION_LAYOUTS = ("heads", "sequence")


class _SeqToHeads(torch.autograd.Function):
    """`[B, T, H, D]` sequence shard -> `[B, W * T, H / W, D]` head shard (backward: the inverse)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, stats: Optional[CommStats]) -> torch.Tensor:
        ctx.comm, ctx.stats = comm, stats
        return seq_to_heads(x, comm, stats, "forward")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return heads_to_seq(g, ctx.comm, ctx.stats, "backward"), None, None


class _HeadsToSeq(torch.autograd.Function):
    """`[B, W * T, H / W, D]` head shard -> `[B, T, H, D]` sequence shard (backward: the inverse)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, stats: Optional[CommStats]) -> torch.Tensor:
        ctx.comm, ctx.stats = comm, stats
        return heads_to_seq(x, comm, stats, "forward")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return seq_to_heads(g, ctx.comm, ctx.stats, "backward"), None, None


def seq_to_heads(x: torch.Tensor, comm: Comm, stats: Optional[CommStats] = None, phase: str = "forward") -> torch.Tensor:
    W = comm.world
    B, T, H = x.shape[:3]
    rest = tuple(x.shape[3:])
    send = x.reshape(B, T, W, H // W, *rest).movedim(2, 0)  # [W, B, T, H/W, ...]: row j to rank j
    recv = comm.all_to_all(send, stats, phase)  # [W, B, T, H/W, ...]: row i from rank i
    return recv.movedim(0, 1).reshape(B, W * T, H // W, *rest)


def heads_to_seq(x: torch.Tensor, comm: Comm, stats: Optional[CommStats] = None, phase: str = "forward") -> torch.Tensor:
    W = comm.world
    B, WT, h = x.shape[:3]
    rest = tuple(x.shape[3:])
    send = x.reshape(B, W, WT // W, h, *rest).movedim(1, 0)  # [W, B, T, h, ...]: rank j's tokens
    recv = comm.all_to_all(send, stats, phase)  # [W, B, T, h, ...]: head group i from rank i
    return recv.movedim(0, 2).reshape(B, WT // W, W * h, *rest)


class _GatherSeq(torch.autograd.Function):
    """`[B, T, ...]` shard -> `[B, W * T, ...]` concatenation of all shards (backward: sum, own slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Comm, stats: Optional[CommStats]) -> torch.Tensor:
        ctx.comm, ctx.stats, ctx.t = comm, stats, x.shape[1]
        return torch.cat(comm.all_gather(x, stats, "forward"), 1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        total = ctx.comm.all_reduce(g, ctx.stats, "backward")
        r, t = ctx.comm.rank, ctx.t
        return total[:, r * t:(r + 1) * t], None, None


def _global_order(layout: str, comm: Comm, local_len: int, device: torch.device) -> Optional[torch.Tensor]:
    """Permutation taking the rank-order concatenation of shards to global order (None: identity)."""
    if layout == "contiguous":
        return None
    pos = torch.cat([positions(layout, comm.world, r, local_len) for r in range(comm.world)])
    return torch.argsort(pos).to(device)


def _kv_plan(hq: int, hkv: int, world: int) -> int:
    """How many times each KV head is repeated before the all-to-all (1: split as is)."""
    if hq < world or hq % world:
        raise AttnkitError(
            f"q: Ulysses splits heads over ranks and needs Hq divisible by the group size, got Hq={hq} for "
            f"{world} ranks; with fewer heads than ranks use attnkit.distributed.hybrid_attention "
            f"(Ulysses over a group of size dividing Hq, ring attention across groups)"
        )
    if hkv % world == 0:
        return 1
    if world % hkv == 0:
        return world // hkv
    raise AttnkitError(
        f"k: Ulysses needs Hkv divisible by the group size or the group size divisible by Hkv, got Hkv={hkv} for "
        f"{world} ranks; use attnkit.distributed.hybrid_attention with a smaller Ulysses group"
    )


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    method: str = "dense",
    causal: bool = True,
    scale: Optional[float] = None,
    layout: str = "contiguous",
    *,
    option_layout: Optional[Mapping[str, str]] = None,
    backend: str = "auto",
    stats: Optional[CommStats] = None,
    **options: Any,
) -> torch.Tensor:
    """Attention of a sequence sharded over `group`, by head-parallel all-to-all (Ulysses).

    `q: [B, T, Hq, D]`, `k: [B, T, Hkv, D]`, `v: [B, T, Hkv, Dv]`: this rank's shard in `layout`
    (`contiguous` or `zigzag`, as `attnkit.distributed.shard` makes it). Returns this rank's rows of
    `attnkit.attention(q_global, k_global, v_global, method=method, causal=causal, **options)`.
    Tensor-valued options that follow the sequence must be named in `option_layout`: `"heads"`
    for `[B, T, Hq, ...]` (split by head like q) or `"sequence"` for `[B, T, ...]` (gathered whole).
    """
    from ..api import attention  # late: the registry imports every method module

    comm = Comm(group, "ulysses_attention")
    option_layout = dict(option_layout or {})
    problem, sig, repeat = None, [-1] * 8, 1
    try:
        check_layout(layout)
        for name, val in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, val, 4, "[B, T, H, D]")
        if k.shape[:3] != v.shape[:3] or k.shape[1] != q.shape[1] or k.shape[0] != q.shape[0]:
            raise AttnkitError(f"k: expected k and v shards [B, T, Hkv, *] matching q {tuple(q.shape)}, "
                               f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if q.shape[1] % chunks_per_rank(layout):
            raise AttnkitError(f"q: layout {layout!r} needs a local length divisible by "
                               f"{chunks_per_rank(layout)}, got {q.shape[1]}")
        if method in HEAD_INDEXED_METHODS:
            raise AttnkitError(f"method: {method!r} depends on the absolute head index, which Ulysses changes; "
                               f"use ring_attention for it")
        for name, val in options.items():
            if isinstance(val, (list, tuple)):
                raise AttnkitError(f"{name}: per-head option lists are not split across ranks by Ulysses; "
                                   f"pass one value for all heads")
            if isinstance(val, torch.Tensor) and val.dim() >= 2 and val.shape[:2] == q.shape[:2]:
                if option_layout.get(name) not in OPTION_LAYOUTS:
                    raise AttnkitError(f"option_layout: tensor option {name!r} has the shard's [B, T] leading dims; "
                                       f"say how it is split: option_layout={{{name!r}: 'heads' or 'sequence'}}")
                if option_layout[name] == "heads" and (val.dim() < 3 or val.shape[2] != q.shape[2]):
                    raise AttnkitError(f"{name}: option_layout 'heads' needs [B, T, Hq={q.shape[2]}, ...], "
                                       f"got {tuple(val.shape)}")
        repeat = _kv_plan(q.shape[2], k.shape[2], comm.world)
        sig = [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], dtype_code(q.dtype), repeat]
    except AttnkitError as e:
        problem = str(e)
    comm.agree(problem, sig, lambda s: f"q [B={s[0]}, T={s[1]}, Hq={s[2]}, D={s[4]}], Hkv={s[3]}, Dv={s[5]}, "
                                       f"dtype {dtype_name(s[6])}")
    T = q.shape[1]
    order = _global_order(layout, comm, T, q.device)

    def to_global(x: torch.Tensor) -> torch.Tensor:
        return x if order is None else x.index_select(1, order)

    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    qh, kh, vh = (to_global(_SeqToHeads.apply(x, comm, stats)) for x in (q, k, v))
    local_opts = dict(options)
    for name, how in option_layout.items():
        val = options.get(name)
        if not isinstance(val, torch.Tensor):
            continue
        moved = _SeqToHeads.apply(val, comm, stats) if how == "heads" else _GatherSeq.apply(val, comm, stats)
        local_opts[name] = to_global(moved)
    o = attention(qh, kh, vh, method=method, causal=causal, scale=scale, backend=backend, **local_opts)
    if order is not None:
        o = o.index_select(1, torch.argsort(order))  # back to rank-order concatenation
    return _HeadsToSeq.apply(o, comm, stats)
