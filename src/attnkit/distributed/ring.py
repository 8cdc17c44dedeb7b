"""Ring attention (Liu et al., "Ring Attention with Blockwise Transformers") over torch.distributed.

Each rank holds a shard of the sequence (`layout.py`). Key/value shards travel around the ring
with `batch_isend_irecv`, the next transfer posted before the current rectangle is computed so
communication overlaps compute; partial outputs merge by their log-sum-exp in float32 (float64
for float64 inputs). The backward pass is part of the same autograd Function: the key/value
gradient of each shard travels with it and returns to its owner, while query gradients stay put.

With a sliding window or packed sequences (`cu_seqlens`) the plan (`schedule.py`) skips
rectangles no query reaches and stops sending shards nobody needs; attention sinks are broadcast
once (`sinks` tokens, not a shard) and attended in their own pass, when they fit in rank 0's
first chunk. Per-head windows run one such ring per distinct window. Each rectangle runs on the
fastest local kernel that returns the LSE (`blocks.pick_kernel`: cuDNN, flash, reference);
`explain_ring` tells, without communicating, what a rank will run and send.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..core.contract import AttnkitError, check_cu_seqlens, compute_dtype, validate_attention
from ..core.masks import Mask
from . import blocks
from .comm import Comm, CommStats, dtype_code, dtype_name
from .layout import chunks_per_rank, check_layout, segments
from .pattern import FULL, NONE, PARTIAL, Visibility
from .schedule import Call, RingSchedule


class _Held:
    """The key/value segments of one shard this rank holds at a step, stored back to back."""

    def __init__(self, segs: tuple[int, ...], lengths: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        self.segs, self.k, self.v = segs, k, v
        self.offsets: dict[int, tuple[int, int]] = {}
        off = 0
        for g in segs:
            self.offsets[g] = (off, lengths[g])
            off += lengths[g]

    def rows(self, segs: tuple[int, ...]) -> tuple[int, int]:
        """Local row range of consecutive held segments."""
        lo = self.offsets[segs[0]][0]
        last = self.offsets[segs[-1]]
        return lo, last[0] + last[1]

    def select(self, segs: tuple[int, ...]) -> list[torch.Tensor]:
        if segs == self.segs:
            return [self.k, self.v]
        parts = [self.offsets[g] for g in segs]
        return [torch.cat([x[:, o:o + n] for o, n in parts], 1) for x in (self.k, self.v)]


class _Ring:
    """One ring call's fixed state: the group, plan, visibility and kernel choice."""

    def __init__(self, comm: Comm, sched: RingSchedule, scale: float, kernel: str, dv: int, sink_pass: bool,
                 stats: Optional[CommStats]) -> None:
        self.comm, self.sched, self.scale, self.kernel, self.dv = comm, sched, scale, kernel, dv
        self.sink_pass, self.stats = sink_pass, stats
        self.sink_vis = Visibility(causal=sched.vis.causal)

    def record(self, q: torch.Tensor, tk: int, call: Call, used: dict[str, str]) -> None:
        """Note in `used` the kernel a call just ran on (`blocks.pick_kernel`, asked after the call so
        a fused kernel that failed and was passed over shows with its reason)."""
        choice = blocks.pick_kernel(self.kernel, q.device, q.dtype, q.shape[-1], self.dv, call.kind,
                                    call.q_hi - call.q_lo, tk)
        used.setdefault(choice.name, choice.describe())

    def lengths(self, src: int) -> list[int]:
        return [s.length for s in self.sched.segs[src]]

    def kv_exchange(self, held: _Held, t: int, like: tuple[torch.Tensor, torch.Tensor], phase: str):
        """Post the transfer of the shards needed at step t + 1 (send ours on, receive the next)."""
        comm, sched = self.comm, self.sched
        if t + 1 >= sched.steps or comm.world == 1:
            return None, ()
        r, W = comm.rank, comm.world
        send_segs = sched.carried((r - t) % W, t + 1)
        recv_src = (r - t - 1) % W
        recv_segs = sched.carried(recv_src, t + 1)
        sends = [(x, (r + 1) % W) for x in held.select(send_segs)] if send_segs else []
        recvs = []
        if recv_segs:
            n = sum(self.lengths(recv_src)[g] for g in recv_segs)
            for x in like:
                shape = (x.shape[0], n) + tuple(x.shape[2:])
                recvs.append((shape, x.dtype, x.device, (r - 1) % W))
        return comm.exchange(sends, recvs, self.stats, phase), recv_segs

    def mask_for(self, call: Call, src: int, held: _Held, vis: Visibility) -> Optional[Mask]:
        if call.kind != PARTIAL:
            return None
        tq = call.q_hi - call.q_lo
        lo, hi = held.rows(call.k_segs)
        k_start = self.sched.segs[src][call.k_segs[0]].start if src >= 0 else 0
        return vis.mask(call.q_start - ((hi - lo) - tq), k_start)


def _sink_calls(sched: RingSchedule, rank: int, local_len: int, n_sinks: int) -> list[Call]:
    """Calls of `rank`'s query segments against the `n_sinks` broadcast sink keys."""
    sink_vis = Visibility(causal=sched.vis.causal)
    out: list[Call] = []
    for q in segments(sched.layout, sched.world, rank, local_len):
        kind = sink_vis.classify(q.start, q.stop, 0, n_sinks)
        if kind == NONE:
            continue
        kind = FULL if kind == FULL else PARTIAL
        if out and kind == FULL and out[-1].kind == FULL and out[-1].q_hi == q.offset:
            out[-1] = Call(out[-1].q_lo, q.offset + q.length, (0,), FULL, out[-1].q_start)
        else:
            out.append(Call(q.offset, q.offset + q.length, (0,), kind, q.start))
    return out


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: _Ring) -> torch.Tensor:
        # q: [B, T, Hq, D], k: [B, T, Hkv, D], v: [B, T, Hkv, Dv] (this rank's shard)
        comm, sched = ring.comm, ring.sched
        r, W = comm.rank, comm.world
        B, T, Hq, _ = q.shape
        used: dict[str, str] = {}
        calls = 0
        acc = blocks.OutputAccumulator(B, T, Hq, v.shape[-1], q.dtype, q.device)
        held = _Held(sched.carried(r, 0), ring.lengths(r), k, v)
        for t in range(sched.steps):
            src = (r - t) % W
            pend, recv_segs = ring.kv_exchange(held, t, (k, v), "forward")
            for c in sched.calls(r, t):
                lo, hi = held.rows(c.k_segs)
                ob, lb = blocks.forward(q[:, c.q_lo:c.q_hi], held.k[:, lo:hi], held.v[:, lo:hi], ring.scale, c.kind,
                                        ring.mask_for(c, src, held, sched.vis), ring.kernel)
                ring.record(q, hi - lo, c, used)
                acc.fold(c.q_lo, c.q_hi, ob, lb)
                calls += 1
            if pend is not None:
                got = pend.wait()  # always: a send's buffer must outlive its completion
                if recv_segs:
                    held = _Held(recv_segs, ring.lengths((r - t - 1) % W), *got)
        sink_kv = None
        if ring.sink_pass:
            n = sched.vis.sinks
            sink_kv = tuple(comm.broadcast(x[:, :n], 0, ring.stats) for x in (k, v))
            sink_held = _Held((0,), [n], *sink_kv)
            for c in _sink_calls(sched, r, T, n):
                ob, lb = blocks.forward(q[:, c.q_lo:c.q_hi], sink_kv[0], sink_kv[1], ring.scale, c.kind,
                                        ring.mask_for(c, -1, sink_held, ring.sink_vis), ring.kernel)
                ring.record(q, n, c, used)
                acc.fold(c.q_lo, c.q_hi, ob, lb)
                calls += 1
        if ring.stats is not None:
            ring.stats.steps = sched.steps
            ring.stats.calls = calls
            ring.stats.kernels = used
        out, lse = acc.result()
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse, *(sink_kv or ()))
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        ring: _Ring = ctx.ring
        q, k, v, out, lse, *sink_kv = ctx.saved_tensors
        comm, sched = ring.comm, ring.sched
        r, W = comm.rank, comm.world
        cd = compute_dtype(q.dtype)
        dout = dout.contiguous()
        dq, dk, dv = blocks.GradAccumulator(q), blocks.GradAccumulator(k), blocks.GradAccumulator(v)
        held = _Held(sched.carried(r, 0), ring.lengths(r), k, v)
        inflight = []  # every posted exchange, finished before returning (send buffers stay alive)
        grad_next = None  # (pending, index): the travelling gradient of the shard held at the next step
        home = None  # (pending, index): our own shard's gradient, coming back from its last step

        def rect_grads(c: Call, src: int, held: _Held, gk, gv, vis: Visibility) -> None:
            """Gradients of one call into dq and into `gk`, `gv` (accumulators or float buffers)."""
            lo, hi = held.rows(c.k_segs)
            rows = slice(c.q_lo, c.q_hi)
            gq, gk_c, gv_c = blocks.backward(dout[:, rows], q[:, rows], held.k[:, lo:hi], held.v[:, lo:hi],
                                             out[:, rows], lse[:, :, rows], ring.scale, c.kind,
                                             ring.mask_for(c, src, held, vis), ring.kernel)
            dq.add(c.q_lo, c.q_hi, gq)
            if isinstance(gk, blocks.GradAccumulator):
                gk.add(lo, hi, gk_c)
                gv.add(lo, hi, gv_c)
            else:
                gk[:, lo:hi] += gk_c
                gv[:, lo:hi] += gv_c

        outbox: list = []
        for t in range(sched.steps):
            src = (r - t) % W
            pend, recv_segs = ring.kv_exchange(held, t, (k, v), "backward")
            if pend is not None:
                inflight.append(pend)
            calls = sched.calls(r, t)
            if t == 0:
                for c in calls:
                    rect_grads(c, src, held, dk, dv, sched.vis)
            elif t <= sched.last[src]:
                gsegs = sched.grad_segments(src)
                gk = torch.zeros(held.k.shape, dtype=cd, device=k.device)
                gv = torch.zeros(held.v.shape, dtype=cd, device=v.device)
                for c in calls:
                    rect_grads(c, src, held, gk, gv, sched.vis)
                if t >= 2:  # the accumulator arrives from the previous rank
                    p, i = grad_next
                    acc_k, acc_v = (x.clone() for x in p.wait()[i:i + 2])
                else:  # first rank after the owner: start the accumulator
                    n = sum(ring.lengths(src)[g] for g in gsegs)
                    acc_k = torch.zeros((k.shape[0], n) + tuple(k.shape[2:]), dtype=cd, device=k.device)
                    acc_v = torch.zeros((v.shape[0], n) + tuple(v.shape[2:]), dtype=cd, device=v.device)
                acc = _Held(gsegs, ring.lengths(src), acc_k, acc_v)
                for g in held.segs:
                    (a, n), (b, _) = acc.offsets[g], held.offsets[g]
                    acc_k[:, a:a + n] += gk[:, b:b + n]
                    acc_v[:, a:a + n] += gv[:, b:b + n]
                outbox.append((acc_k, acc_v, (r + 1) % W if t < sched.last[src] else src))
            gp, i_next, i_home = _grad_exchange(ring, t, outbox, k, v, cd)
            if gp is not None:
                inflight.append(gp)
            grad_next = (gp, i_next) if i_next is not None else None
            if i_home is not None:
                home = (gp, i_home)
            if pend is not None:
                got = pend.wait()
                if recv_segs:
                    held = _Held(recv_segs, ring.lengths((r - t - 1) % W), *got)
        if home is not None:
            p, i = home
            rk, rv = p.wait()[i:i + 2]
            for g, (a, n) in _Held(sched.grad_segments(r), ring.lengths(r), rk, rv).offsets.items():
                off = sched.segs[r][g].offset
                dk.add_tensor(off, off + n, rk[:, a:a + n])
                dv.add_tensor(off, off + n, rv[:, a:a + n])
        for p in inflight:
            p.wait()
        if ring.sink_pass:
            n = sched.vis.sinks
            sk, sv = sink_kv
            gk = torch.zeros(sk.shape, dtype=cd, device=sk.device)
            gv = torch.zeros(sv.shape, dtype=cd, device=sv.device)
            sink_held = _Held((0,), [n], sk, sv)
            for c in _sink_calls(sched, r, q.shape[1], n):
                rect_grads(c, -1, sink_held, gk, gv, ring.sink_vis)
            gk = comm.all_reduce(gk, ring.stats, "backward")
            gv = comm.all_reduce(gv, ring.stats, "backward")
            if r == 0:
                dk.add_tensor(0, n, gk)
                dv.add_tensor(0, n, gv)
        return dq.result(), dk.result(), dv.result(), None


def _grad_exchange(ring: _Ring, t: int, outbox: list, k: torch.Tensor, v: torch.Tensor, cd: torch.dtype):
    """At the end of step t: send the travelling gradients in `outbox` (to the next rank, or home to
    their owner after their last step), post the receive of the one this rank holds at step t + 1
    and, at our own shard's last step, the receive of our gradient coming home.

    Returns `(pending or None, index of the next travelling gradient or None, index of ours or None)`:
    indices into the pending's received tensors (key then value gradient)."""
    comm, sched = ring.comm, ring.sched
    r, W = comm.rank, comm.world
    sends = [(x, dest) for acc_k, acc_v, dest in outbox for x in (acc_k, acc_v)]
    outbox.clear()
    recvs: list = []

    def want(src: int, peer: int) -> int:
        n = sum(ring.lengths(src)[g] for g in sched.grad_segments(src))
        for x in (k, v):
            recvs.append(((x.shape[0], n) + tuple(x.shape[2:]), cd, x.device, peer))
        return len(recvs) - 2

    nxt, nxt_src = t + 1, (r - t - 1) % W
    i_next = want(nxt_src, (r - 1) % W) if 2 <= nxt < sched.steps and nxt <= sched.last[nxt_src] else None
    i_home = want(r, (r + sched.last[r]) % W) if W > 1 and sched.last[r] >= 1 and t == sched.last[r] else None
    if not sends and not recvs:
        return None, None, None
    return comm.exchange(sends, recvs, ring.stats, "backward"), i_next, i_home


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
    causal: bool = True,
    layout: str = "zigzag",
    window: Union[None, int, Sequence[int]] = None,
    sinks: int = 0,
    scale: Optional[float] = None,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    stats: Optional[CommStats] = None,
) -> torch.Tensor:
    """Exact attention of a sequence sharded over the ranks of `group`.

    `q: [B, T, Hq, D]`, `k: [B, T, Hkv, D]`, `v: [B, T, Hkv, Dv]` are this rank's shard (`T` local
    tokens, laid out by `layout`: see `attnkit.distributed.shard`); returns this rank's rows of the
    output `[B, T, Hq, Dv]`, equal to attention over the whole sequence. `causal` is in global
    positions. `window` (an int, or one int per query head as in MSWA) and `sinks` follow the
    `sliding_window` method (visible iff `|i - j| < window` or `j < sinks`, and causal); shards
    outside every window are neither computed nor sent. Per-head windows run one ring per distinct
    window over its heads (each with its own window-aware plan). `backend`: `auto`, `cudnn`,
    `flash` or `reference` (`blocks.pick_kernel`; `stats.kernels` says which ran and why). `stats`,
    if given, receives the bytes this rank sent in forward and backward. `cu_seqlens` (int [N+1],
    the same on every rank, in *global* positions, B == 1) packs N sequences: attention stays inside
    each, windows and sinks count from each sequence's start, and shards two ranks' sequences
    never share are neither computed nor sent.

    Every rank must call with equal shapes; a mismatch raises the same `AttnkitError` on all of
    them. Set a timeout in `init_process_group` so a rank that never calls cannot hang the rest.
    """
    comm = Comm(group, "ring_attention")
    problem, sig, docs = None, [-1] * 10, None
    try:
        check_layout(layout)
        if backend not in blocks.KERNELS:
            raise AttnkitError(f"backend: expected one of {blocks.KERNELS}, got {backend!r}")
        call = validate_attention(q, k, v, causal=causal, scale=scale)
        windows = _check_windows(window, call.hq)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise AttnkitError(f"sinks: expected an int >= 0, got {sinks!r}")
        if call.tq != call.tk:
            raise AttnkitError(f"k: expected a key shard as long as the query shard ({call.tq}), got {call.tk}")
        per = chunks_per_rank(layout)
        if call.tq % per:
            raise AttnkitError(f"q: layout {layout!r} needs a local length divisible by {per}, got {call.tq}")
        if cu_seqlens is not None:
            docs = tuple(check_cu_seqlens(cu_seqlens, comm.world * call.tq, call.batch, q.device).tolist())
        sig = [call.batch, call.tq, call.hq, call.hkv, call.head_dim, call.head_dim_v, dtype_code(call.dtype),
               _window_code(windows), sinks, -1 if docs is None else _window_code(docs)]
    except AttnkitError as e:
        problem = str(e)
    comm.agree(problem, sig, lambda s: (f"q [B={s[0]}, T={s[1]}, Hq={s[2]}, D={s[4]}], k/v Hkv={s[3]}, Dv={s[5]}, "
                                        f"dtype {dtype_name(s[6])}, window code {s[7]}, sinks={s[8]}, "
                                        f"cu_seqlens code {s[9]}"))
    if isinstance(windows, tuple):
        return _per_head_rings(q, k, v, group, causal, layout, windows, sinks, scale, backend, stats, cu_seqlens)
    sched, sink_pass = plan(comm.world, q.shape[1], layout, causal, windows, sinks, docs)
    ring = _Ring(comm, sched, call.scale, backend, call.head_dim_v, sink_pass, stats)
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), ring)


def _check_windows(window: object, hq: int) -> Union[None, int, tuple[int, ...]]:
    """None, one int, or a tuple of `hq` ints (a list whose entries are all equal becomes one int)."""
    def ok(w: object) -> bool:
        return isinstance(w, int) and not isinstance(w, bool) and w >= 1

    if window is None or ok(window):
        return window  # type: ignore[return-value]
    if isinstance(window, (list, tuple)):
        if len(window) != hq or not all(ok(w) for w in window):
            raise AttnkitError(f"window: expected None, an int >= 1 or a list of {hq} ints >= 1 (one per query "
                               f"head), got {list(window)!r}")
        return window[0] if len(set(window)) == 1 else tuple(window)
    raise AttnkitError(f"window: expected None, an int >= 1 or a per-head list of ints, got {window!r}")


def _window_code(windows: Union[None, int, tuple[int, ...]]) -> int:
    """An int that differs when the windows differ (for the ranks' agreement check; no hash seeds)."""
    if windows is None:
        return -1
    if isinstance(windows, int):
        return windows
    code = 0
    for w in windows:
        code = (code * 1_000_003 + w) % (2**61 - 1)
    return -2 - code


def _per_head_rings(q, k, v, group, causal, layout, windows: tuple[int, ...], sinks, scale, backend, stats,
                    cu_seqlens):
    """One ring per distinct window over the query heads that have it. When those heads make up
    whole GQA groups their KV heads travel once; otherwise each query head gets its KV head."""
    hq, hkv = q.shape[2], k.shape[2]
    g = hq // hkv
    by_window: dict[int, list[int]] = {}
    for h, w in enumerate(windows):
        by_window.setdefault(w, []).append(h)
    parts, order = [], []
    steps, calls, kernels = 0, 0, {}
    for w, heads in by_window.items():
        kv = sorted({h // g for h in heads})
        if sorted(heads) == [j * g + i for j in kv for i in range(g)]:
            kv_index = kv
        else:
            kv_index = [h // g for h in heads]
        idx = torch.tensor(heads, device=q.device)
        kv_idx = torch.tensor(kv_index, device=q.device)
        # bytes accumulate in `stats` (backward too); steps, calls and kernels are per ring: combine them
        parts.append(ring_attention(q.index_select(2, idx), k.index_select(2, kv_idx), v.index_select(2, kv_idx),
                                    group, causal, layout, w, sinks, scale, cu_seqlens=cu_seqlens, backend=backend,
                                    stats=stats))
        order += heads
        if stats is not None:
            steps, calls = max(steps, stats.steps), calls + stats.calls
            kernels.update({n: why for n, why in stats.kernels.items() if n not in kernels})
    if stats is not None:
        stats.steps, stats.calls, stats.kernels = steps, calls, kernels
    inverse = torch.argsort(torch.tensor(order, device=q.device))
    return torch.cat(parts, dim=2).index_select(2, inverse)


@functools.lru_cache(maxsize=64)
def plan(world: int, local_len: int, layout: str, causal: bool, window: Optional[int], sinks: int,
         docs: Optional[tuple[int, ...]] = None) -> tuple[RingSchedule, bool]:
    """The ring's schedule for one window, and whether sinks get their own broadcast pass (they do
    when a window is set, the sequence is not packed and the sinks fit in rank 0's first chunk;
    otherwise they circulate). Memoised: a model calls the ring with the same shapes every layer."""
    first_chunk = segments(layout, world, 0, local_len)[0].length
    sink_pass = window is not None and docs is None and 0 < sinks <= first_chunk
    vis = Visibility(causal=causal, window=window, sinks=sinks, exclude_sinks=sink_pass, docs=docs)
    return RingSchedule(world, local_len, layout, vis), sink_pass


def predicted_bytes(sched: RingSchedule, sink_pass: bool, rank: int, kv_token_bytes: int,
                    grad_token_bytes: int) -> tuple[int, int]:
    """Bytes `rank` sends in forward and backward under `sched`: the key/value segments it forwards
    (`kv_token_bytes` per token: B * Hkv * (D + Dv) * itemsize), the travelling key/value gradients
    (`grad_token_bytes` per token, accumulation dtype), the sink broadcast and its gradient reduce."""
    W = sched.world
    kv = sum(sched.seg_len((rank - t) % W, g) for t in range(sched.steps - 1)
             for g in sched.carried((rank - t) % W, t + 1)) if W > 1 else 0
    grads = sum(sched.seg_len(src, g) for t in range(1, sched.steps) for src in [(rank - t) % W]
                if t <= sched.last[src] for g in sched.grad_segments(src))
    fwd, bwd = kv * kv_token_bytes, kv * kv_token_bytes + grads * grad_token_bytes
    if sink_pass:
        n = sched.vis.sinks
        fwd += n * kv_token_bytes * (W - 1) if rank == 0 else 0
        bwd += n * grad_token_bytes
    return fwd, bwd


@dataclass
class RingExplanation:
    """What `ring_attention` will do on one rank: plan size, kernels and the bytes it will send."""

    world: int
    rank: int
    steps: int = 0
    calls: int = 0
    kernels: dict[str, str] = field(default_factory=dict)  # kernel -> why (faster ones passed over)
    forward_bytes: int = 0
    backward_bytes: int = 0
    rings: int = 1  # one per distinct per-head window

    def __str__(self) -> str:
        ks = "; ".join(f"{k}: {why}" for k, why in self.kernels.items())
        return (f"ring on rank {self.rank}/{self.world}: {self.rings} ring(s), {self.steps} steps, {self.calls} "
                f"local calls, kernels [{ks}], sends {self.forward_bytes} B forward, {self.backward_bytes} B backward")


def explain_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world: int, rank: int = 0, causal: bool = True,
                 layout: str = "zigzag", window: Union[None, int, Sequence[int]] = None, sinks: int = 0,
                 backend: str = "auto", cu_seqlens: Optional[torch.Tensor] = None) -> RingExplanation:
    """For this rank's shards (any device, `meta` included) and a world size, say what
    `ring_attention` with the same arguments would run and send; needs no process group."""
    check_layout(layout)
    if backend not in blocks.KERNELS:
        raise AttnkitError(f"backend: expected one of {blocks.KERNELS}, got {backend!r}")
    call = validate_attention(q, k, v, causal=causal)
    windows = _check_windows(window, call.hq)
    if isinstance(windows, tuple):
        groups: dict[int, list[int]] = {}
        for h, w in enumerate(windows):
            groups.setdefault(w, []).append(h)
        g = call.hq // call.hkv
        subs = []
        for w, heads in groups.items():
            kv = sorted({h // g for h in heads})
            n_kv = len(kv) if sorted(heads) == [j * g + i for j in kv for i in range(g)] else len(heads)
            kv_like = [x[:, :, :1].expand(-1, -1, n_kv, -1) for x in (k, v)]
            subs.append(explain_ring(q[:, :, heads], *kv_like, world, rank, causal, layout,
                                     w, sinks, backend, cu_seqlens))
        out = RingExplanation(world, rank, rings=len(subs))
        for sub in subs:
            out.steps, out.calls = max(out.steps, sub.steps), out.calls + sub.calls
            out.forward_bytes += sub.forward_bytes
            out.backward_bytes += sub.backward_bytes
            for name, why in sub.kernels.items():
                out.kernels.setdefault(name, why)
        return out
    docs = None if cu_seqlens is None else tuple(
        check_cu_seqlens(cu_seqlens, world * call.tq, call.batch, cu_seqlens.device).tolist())
    sched, sink_pass = plan(world, call.tq, layout, causal, windows, sinks, docs)
    token = call.batch * call.hkv * (call.head_dim + call.head_dim_v)
    fwd, bwd = predicted_bytes(sched, sink_pass, rank, token * q.element_size(),
                               token * torch.empty((), dtype=compute_dtype(q.dtype)).element_size())
    out = RingExplanation(world, rank, steps=sched.steps, forward_bytes=fwd, backward_bytes=bwd)
    calls = [(c, sum(sched.seg_len((rank - t) % world, g) for g in c.k_segs))
             for t in range(sched.steps) for c in sched.calls(rank, t)]
    if sink_pass:
        calls += [(c, sinks) for c in _sink_calls(sched, rank, call.tq, sinks)]
    for c, tk in calls:
        choice = blocks.pick_kernel(backend, q.device, q.dtype, call.head_dim, call.head_dim_v, c.kind,
                                    c.q_hi - c.q_lo, tk)
        out.kernels.setdefault(choice.name, choice.describe())
    out.calls = len(calls)
    return out
