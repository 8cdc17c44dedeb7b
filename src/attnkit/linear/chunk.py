"""The chunked parallel form shared by the whole family (training and prefill).

One engine covers the six methods. Per head, with a state `S: [K, V]`, a log-space decay
`g_t` (none, scalar per head, or one per key channel) and, for the delta family, a step `beta_t`:

    gated linear:  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    gated delta:   S'_t = diag(exp(g_t)) S_{t-1};  S_t = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T
    output:        o_t = S_t^T (scale * q_t)

The sequence is cut into chunks of C tokens. With `b` the within-chunk cumulative sum of g and
`S` the state entering the chunk (Yang et al., "Gated Linear Attention Transformers with
Hardware-Efficient Training", 2024):

    o_i    = (q_i * exp(b_i)) S + sum_{j <= i} [(q_i * exp(b_i - b_j)) . k_j] u_j
    S_next = diag(exp(b_C)) S + sum_j (k_j * exp(b_C - b_j)) u_j^T

where `u = v` for gated linear attention. For the delta family `u` is the "pseudo-value"
`u_i = beta_i (v_i - S'_i^T k_i)`, which solves the unit-lower-triangular system
`(I + M) u = beta * (v - (k * exp(b)) S)` with `M_ij = beta_i [(k_i * exp(b_i - b_j)) . k_j]`
for j < i. Writing `T = (I + M)^-1`, `u = T (beta v) - T (beta k exp(b)) S = u0 - W S`: the
WY / UT representation (Yang et al., "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length", 2024; Gated DeltaNet and Kimi Linear extend it with decays). `u0`, `W`
and all intra-chunk scores are computed for every chunk at once.

State pass. Across chunks the state obeys `S_n = diag(d_n) S_{n-1} + U_n` (gated linear,
`U_n = k_out_n^T v_n`) or `S_n = P_n S_{n-1} + Q_n` (delta family, `P_n = diag(d_n) -
k_out_n^T W_n`, `Q_n = k_out_n^T u0_n`). A loop over the N chunks launches a few small kernels
per chunk (N = 512 at T = 32K, C = 64), which is what a GPU pays for, so the chunks are taken
in groups of G ~ sqrt(N) (`state_group_size`):

  * gated linear: no loop at all. The states from zero inside every group are one
    decay-weighted sum over the group's chunks (a [G + 1, G] weight, per key channel for vector
    decays, one batched matmul / einsum for all groups); the states entering the groups are
    the same weighted sum over the groups' end states; the output reads both
    (`q_in @ local + (q_in * decay from the group's start) @ entering`).
  * delta family: an inner loop over the G positions of a group, batched over all groups,
    builds the local states from zero and the products `P_i ... P_0` of the transitions; an
    outer loop over the N / G groups carries the entering states; every chunk's state is then
    `product @ entering + local`, batched over groups. Sequential depth G - 1 + N / G (47 at
    N = 512) instead of N, for about N K^2 (K + 2V) multiply-adds (the chunk-by-chunk loop:
    2 N C K V). The
    backward is written by hand (`_TransitionScan`): the adjoint obeys the same recurrence run
    backwards with transposed transitions, so it is the same two-level scan.

The token axis is padded to whole groups; padded tokens have k = v = 0, g = 0 and beta = 0,
so they leave the state unchanged. States and all accumulation are float32 (float64 for
float64 inputs), whatever the input dtype.

Every exponent used is a difference `b_later - b_earlier <= 0` (within a chunk, within a group
or across groups), so no factor can overflow whatever the decay's strength. For per-channel
decays the intra-chunk score `sum_c q_ic k_jc exp(b_ic - b_jc)` does not factor into one matmul;
it is built by halving (`_VectorDecayScores`): at every level each block's lower-left quadrant
is one matmul after rescaling both halves to the boundary between them (both factors <= 1), so
a level costs about one pass over q and k, instead of the `[C, s, K]` elementwise products of
fixed sub-blocks of s tokens; only blocks of odd size (1 when C is a power of two) are done
elementwise. No tensor larger than `C x C` per head and chunk is formed along the sequence.

`engine_for` returns a `torch.compile`d engine for CUDA tensors when ATTNKIT_LINEAR_COMPILE is
set; eager is the default everywhere.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import config
from ..core.contract import compute_dtype


def _to_chunks(x: torch.Tensor, C: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...] in `dtype`, zero-padded to N * C tokens.

    One copy (cast and transpose together) when no padding is needed, and one in backward.
    """
    B, T, H = x.shape[:3]
    if N * C > T:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))
    out = torch.empty((B, H, N * C, *x.shape[3:]), dtype=dtype, device=x.device)
    out.copy_(x.transpose(1, 2))  # `.to()` would keep the transposed strides
    return out.view(B, H, N, C, *x.shape[3:])


def _masked_out(rows: int, cols: int, strict: bool, device: torch.device) -> torch.Tensor:
    """[rows, cols] bool, True above the causal part: where j > i (j >= i when strict).

    Cached in eager mode (a few tiny kernel launches per call on a GPU; callers never write to
    it); built inline under torch.compile, which folds it into constants.
    """
    if torch.compiler.is_compiling():
        return _build_masked_out(rows, cols, strict, device)
    return _cached_masked_out(rows, cols, strict, device)


def _build_masked_out(rows: int, cols: int, strict: bool, device: torch.device) -> torch.Tensor:
    return ~torch.ones(rows, cols, dtype=torch.bool, device=device).tril(-1 if strict else 0)


_cached_masked_out = functools.lru_cache(maxsize=64)(_build_masked_out)


def state_group_size(N: int) -> int:
    """Chunks per group for the state pass: near sqrt(N), preferring a divisor of N (no padding)."""
    root = math.sqrt(N)
    divisors = [d for d in range(math.ceil(root / 2), math.floor(2 * root) + 1) if N % d == 0]
    if divisors:
        return min(divisors, key=lambda d: (round(abs(math.log(d / root)), 9), d))  # ties: the smaller
    groups = -(-N // math.ceil(root))
    return -(-N // groups)


# --- intra-chunk scores -----------------------------------------------------------------------


def decay_scores(
    a: torch.Tensor,
    c: torch.Tensor,
    b: Optional[torch.Tensor],
    strict: bool,
    factors: Optional[list[torch.Tensor]] = None,
) -> torch.Tensor:
    """Causal intra-chunk scores `A_ij = sum_x a_ix c_jx exp(b_ix - b_jx)` for j <= i (j < i if strict).

    a, c: [..., C, K]; b: None (no decay), [..., C] (scalar decay) or [..., C, K] (per channel);
    factors: `halving_factors(b)` for per-channel decays (computed when None; pass them to share
    them between calls). Returns [..., C, C], zero above the diagonal (and on it when strict).
    """
    C = a.shape[-2]
    if b is None or b.dim() == a.dim() - 1:
        above = _masked_out(C, C, strict, a.device)
        s = a @ c.transpose(-1, -2)
        if b is None:
            return s.masked_fill(above, 0.0)
        diff = (b[..., :, None] - b[..., None, :]).masked_fill(above, float("-inf"))
        return s * diff.exp()
    if factors is None:
        factors = halving_factors(b)
    a = a.contiguous()
    # the same tensor twice (M = k.k) as None: torch.compile cannot trace duplicate inputs
    return _VectorDecayScores.apply(a, None if c is a else c.contiguous(), b, factors, strict)


def _odd_part(C: int) -> int:
    while C % 2 == 0:
        C //= 2
    return C


def _block_diagonal(x: torch.Tensor, size: int) -> torch.Tensor:
    """View of the diagonal blocks of `size` of x: [..., C, C] -> [..., size, size, C // size]."""
    n = x.shape[-1] // size
    return x.view(*x.shape[:-2], n, size, n, size).diagonal(dim1=-4, dim2=-2)


def halving_factors(b: torch.Tensor) -> list[torch.Tensor]:
    """Decay factors of the halving levels (no autograd: `_VectorDecayScores` differentiates b).

    b: [..., C, K], C = s * 2^L with s odd. For h = s, 2s, ..., C / 2, blocks of 2h tokens are
    split into halves and rescaled to the boundary between them, `b_ref` the lower half's last
    entry: per level, `exp(b_ref - b_j)` on the lower halves and `exp(b_i - b_ref)` on the
    upper halves, each [..., C / 2h, h, K]; both exponents are <= 0. Returned flat:
    [lower_1, upper_1, lower_2, upper_2, ...].
    """
    lead, (C, K) = b.shape[:-2], b.shape[-2:]
    out = []
    h = _odd_part(C)
    with torch.no_grad():
        b = b.contiguous()
        while h < C:
            b_lo, b_hi = b.view(*lead, C // (2 * h), 2, h, K).unbind(-3)
            ref = b_lo[..., h - 1 : h, :]
            out += [(ref - b_lo).exp_(), (b_hi - ref).exp_()]
            h *= 2
    return out


def _odd_block_decay(b: torch.Tensor, s: int, strict: bool) -> torch.Tensor:
    """exp(b_i - b_j) on the causal part of each odd diagonal block: [..., C / s, s, s, K]."""
    lead, (C, K) = b.shape[:-2], b.shape[-2:]
    b4 = b.reshape(*lead, C // s, s, K)
    above = _masked_out(s, s, strict, b.device)[..., None]
    return (b4[..., :, None, :] - b4[..., None, :, :]).masked_fill(above, float("-inf")).exp()


class _VectorDecayScores(torch.autograd.Function):
    """`decay_scores` for per-channel decays, by halving (module docstring).

    Hand-written backward: autograd through the half-block views would zero-fill a full-size
    gradient for every view at every level. With `da`, `dc` accumulated in place, the decay's
    gradient is `db = a * da - c * dc` (A depends on b only through exp(b_i - b_j)).
    """

    @staticmethod
    def forward(ctx, a, c, b, factors, strict):  # type: ignore[no-untyped-def]
        ctx.same = c is None  # c is a
        c = a if c is None else c
        lead, (C, K) = a.shape[:-2], a.shape[-2:]
        s = _odd_part(C)
        out = a.new_zeros(*lead, C, C)
        if s == 1:
            if not strict:
                out.diagonal(dim1=-2, dim2=-1).copy_((a * c).sum(-1))
        else:
            a4, c4 = a.view(*lead, C // s, s, K), c.view(*lead, C // s, s, K)
            diag = (a4[..., :, None, :] * c4[..., None, :, :] * _odd_block_decay(b, s, strict)).sum(-1)
            _block_diagonal(out, s).copy_(diag.movedim(-3, -1))
        for f_lo, f_hi in zip(factors[::2], factors[1::2]):
            n, h = f_lo.shape[-3], f_lo.shape[-2]
            hi = a.view(*lead, n, 2, h, K)[..., 1, :, :] * f_hi
            lo = c.view(*lead, n, 2, h, K)[..., 0, :, :] * f_lo
            _block_diagonal(out, 2 * h)[..., h:, :h, :].copy_((hi @ lo.transpose(-1, -2)).movedim(-3, -1))
        ctx.strict = strict
        if ctx.same:
            ctx.save_for_backward(a, b, *factors)
        else:
            ctx.save_for_backward(a, c, b, *factors)
        return out

    @staticmethod
    def backward(ctx, dA):  # type: ignore[no-untyped-def]
        if ctx.same:
            a, b, *factors = ctx.saved_tensors
            c = a
        else:
            a, c, b, *factors = ctx.saved_tensors
        lead, (C, K) = a.shape[:-2], a.shape[-2:]
        s = _odd_part(C)
        dA = dA.contiguous()
        if s == 1:
            if ctx.strict:
                da, dc = torch.zeros_like(a), torch.zeros_like(c)
            else:
                d = dA.diagonal(dim1=-2, dim2=-1)[..., None]
                da, dc = d * c, d * a
        else:
            a4, c4 = a.view(*lead, C // s, s, K), c.view(*lead, C // s, s, K)
            x = _block_diagonal(dA, s).movedim(-1, -3)[..., None] * _odd_block_decay(b, s, ctx.strict)
            da = (x * c4[..., None, :, :]).sum(-2).view_as(a)
            dc = (x * a4[..., :, None, :]).sum(-3).view_as(c)
        for f_lo, f_hi in zip(factors[::2], factors[1::2]):
            n, h = f_lo.shape[-3], f_lo.shape[-2]
            a_hi = a.view(*lead, n, 2, h, K)[..., 1, :, :]
            c_lo = c.view(*lead, n, 2, h, K)[..., 0, :, :]
            dq = _block_diagonal(dA, 2 * h)[..., h:, :h, :].movedim(-1, -3)  # [..., n, h, h]
            da.view(*lead, n, 2, h, K)[..., 1, :, :].addcmul_(dq @ (c_lo * f_lo), f_hi)
            dc.view(*lead, n, 2, h, K)[..., 0, :, :].addcmul_(dq.transpose(-1, -2) @ (a_hi * f_hi), f_lo)
        if ctx.same:
            return da + dc, None, a * (da - dc), None, None
        return da, dc, a * da - c * dc, None, None


# --- state pass -------------------------------------------------------------------------------


def _weighted_sum(w: torch.Tensor, x: torch.Tensor, split: Optional[int] = None):  # type: ignore[no-untyped-def]
    """out_r = sum_j w_rj * x_j: w [..., R, J, 1 or K] (per key channel), x [..., J, K, V].

    With `split`, returns (rows [..., :split], row [..., split]) for R = split + 1, taking the
    last row as a separate matvec for scalar weights so that the first part stays contiguous.
    """
    J, K, V = x.shape[-3:]
    if w.shape[-1] == 1:
        x2 = x.reshape(*x.shape[:-3], J, K * V)
        if split is None:
            out = w[..., 0] @ x2
            return out.view(*out.shape[:-1], K, V)
        rows = w[..., :split, :, 0] @ x2
        last = w[..., split : split + 1, :, 0] @ x2
        return rows.view(*rows.shape[:-1], K, V), last.view(*last.shape[:-2], K, V)
    out = torch.einsum("...rjk,...jkv->...rkv", w, x)
    if split is None:
        return out
    rows, last = out.split([split, 1], dim=-3)
    return rows, last.squeeze(-3)


def _decay_scan(
    U: torch.Tensor, ell: Optional[torch.Tensor], S0: Optional[torch.Tensor], G: int
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """`S_n = diag(exp(ell_n)) S_{n-1} + U_n` over chunks, in two levels and without a loop.

    U: [B, H, N, K, V]; ell: None, [B, H, N, 1] or [B, H, N, K] (log space, <= 0); S0: None or
    [B, H, K, V]; N a multiple of G. Returns (L, lamx, E): the state entering chunk n is
    `L_n + exp(lamx_n) * E_{n // G}`, with L: [B, H, N, K, V] the state from zero at the start of
    n's group, lamx: [B, H, N, 1 or K] the log decay from that start to n (None without decay),
    and E: [B, H, N / G + 1, K, V] the states entering each group, the last one the final state.
    """
    B, H, N, K, V = U.shape
    ng = N // G
    Ug = U.view(B, H, ng, G, K, V)
    # weights [.., G + 1 rows, G]: row i < G is the state entering chunk i, row G the one leaving
    # the group; entries exp(log decay from after chunk j to the row's position), causal
    inside = _masked_out(G + 1, G, True, U.device)
    across = _masked_out(ng + 1, ng, True, U.device)
    if ell is None:
        L, ends = _weighted_sum((~inside).to(U.dtype)[..., None], Ug, G)
        E = _weighted_sum((~across).to(U.dtype)[..., None], ends)
        if S0 is not None:
            E = E + S0[:, :, None]
        return L.reshape(B, H, N, K, V), None, E
    lg = ell.reshape(B, H, ng, G, -1)
    lam = lg.cumsum(3)  # through chunk i, from the group's start
    rows = F.pad(lam, (0, 0, 1, 0))  # before chunk i, i = 0..G (row G: the whole group)
    w = (rows[..., :, None, :] - lam[..., None, :, :]).masked_fill(inside[..., None], float("-inf")).exp()
    L, ends = _weighted_sum(w, Ug, G)  # [B, H, ng, G, K, V], [B, H, ng, K, V]
    tot = lam[:, :, :, -1].cumsum(2)  # [B, H, ng, Kd]: through group j
    totx = F.pad(tot, (0, 0, 1, 0))  # [B, H, ng + 1, Kd]: before group j (last row: everything)
    wg = (totx[..., :, None, :] - tot[..., None, :, :]).masked_fill(across[..., None], float("-inf")).exp()
    E = _weighted_sum(wg, ends)
    if S0 is not None:
        E = E + totx.exp()[..., None] * S0[:, :, None]
    return L.reshape(B, H, N, K, V), rows[:, :, :, :G].reshape(B, H, N, -1), E


def _affine(T: torch.Tensor, E: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """`T @ E + L` as one baddbmm over the flattened leading dims."""
    out = torch.baddbmm(L.flatten(0, -3), T.flatten(0, -3), E.flatten(0, -3))
    return out.view(*E.shape[:-2], *out.shape[-2:])


def _scan(
    P: torch.Tensor, Q: torch.Tensor, S0: Optional[torch.Tensor], G: int, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`S_n = P_n S_{n-1} + Q_n` over chunks in two levels: sequential depth G - 1 + N / G.

    P: [B, H, N, K, K]; Q: [B, H, N, K, V]; S0: None (zero) or [B, H, K, V]; N a multiple of G.
    Returns (the state entering each chunk [B, H, N, K, V], the final state [B, H, K, V]).
    `reverse`: run from the last chunk to the first with the transposed transitions,
    `S_{n-1} = P_n^T S_n + Q_n` (the adjoint recurrence of the backward pass); the state
    "entering" chunk n is then S_n.
    """
    B, H, N, K, V = Q.shape
    ng = N // G
    # unbind, not indexing: one node instead of a zero-filled full-size gradient per step
    Ps, Qs = P.view(B, H, ng, G, K, K).unbind(3), Q.view(B, H, ng, G, K, V).unbind(3)
    if reverse:
        Ps = tuple(p.mT for p in Ps)
    order = list(range(G))[::-1] if reverse else list(range(G))
    # inner loop, all groups at once: L_i the state from zero at the group's start after its
    # chunk i, T_i the product of the transitions from that start through chunk i
    Ls, Ts = {order[0]: Qs[order[0]]}, {order[0]: Ps[order[0]]}
    for prev, i in zip(order, order[1:]):
        Ls[i] = _affine(Ps[i], Ls[prev], Qs[i])
        Ts[i] = Ps[i] @ Ts[prev]
    # outer loop: the state entering each group
    E = Q.new_zeros(B, H, K, V) if S0 is None else S0
    entering: list[torch.Tensor] = [E] * ng
    T_end, L_end = Ts[order[-1]].unbind(2), Ls[order[-1]].unbind(2)
    for j in range(ng)[::-1] if reverse else range(ng):
        entering[j] = E
        E = _affine(T_end[j], E, L_end[j])
    Ein = torch.stack(entering, 2)  # [B, H, ng, K, V]
    # fix-up: chunk i of a group is entered with T_prev E + L_prev (prev: the chunk before it)
    Sin = [Ein] * G
    for prev, i in zip(order, order[1:]):
        Sin[i] = _affine(Ts[prev], Ein, Ls[prev])
    return torch.stack(Sin, 3).view(B, H, N, K, V), E


class _TransitionScan(torch.autograd.Function):
    """`_scan` with a hand-written backward: the adjoint `R_n = dL/dS_n` obeys the same
    recurrence run backwards with transposed transitions, `R_{n-1} = P_n^T R_n + dSin_n` from
    `R_{N-1} = dfinal`, so it reuses the two-level scan; then `dQ_n = R_n`,
    `dP_n = R_n Sin_n^T`, `dS0 = R_{-1}`. Autograd through the loops would keep every
    intermediate and launch several times as many kernels."""

    @staticmethod
    def forward(ctx, P, Q, S0, G):  # type: ignore[no-untyped-def]
        Sin, final = _scan(P, Q, S0, G)
        ctx.G, ctx.has_s0 = G, S0 is not None
        ctx.save_for_backward(P, Sin)
        return Sin, final

    @staticmethod
    def backward(ctx, dSin, dfinal):  # type: ignore[no-untyped-def]
        P, Sin = ctx.saved_tensors
        R, dS0 = _scan(P, dSin.contiguous(), dfinal.contiguous(), ctx.G, reverse=True)
        return R @ Sin.mT, R, (dS0 if ctx.has_s0 else None), None


# --- engine -----------------------------------------------------------------------------------


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    scale: float,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    *,
    group_size: Optional[int] = None,
    engine: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated linear attention (`beta is None`) or gated delta rule (`beta` given).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: None, [B, T, H] or [B, T, H, K] (log space);
    beta: None or [B, T, H]; initial_state: None or [B, H, K, V].
    Returns o: [B, T, H, V] in q's dtype and the final state [B, H, K, V] in float32
    (float64 for float64 inputs). Inputs are assumed validated. `group_size` (chunks per group
    of the state pass) is chosen near sqrt(#chunks) when None; tests set it. `engine` replaces
    the eager engine (`engine_for`'s compiled one).

    Non-finite inputs stay where the recurrence puts them. The chunked form mixes every token of
    a chunk or group through matmuls whose weights are exactly 0 for the future, and `0 * NaN`
    is NaN, so a non-finite token would reach earlier rows. When some input is not finite (one
    check per call), the engine runs on inputs with those entries replaced by 0 and the rows
    they reach are set to NaN with `torch.where`: a non-finite k, v, g or beta at t reaches the
    rows t' >= t of its (batch, head) and the final state, a non-finite q only its own row, a
    non-finite initial state everything of its (batch, head). Rows before are bitwise those of
    any finite value in its place (the zero weights make them independent of it).
    """
    run = engine or _chunk_engine
    present = [x for x in (q, k, v, g, beta, initial_state) if x is not None]
    if q.shape[1] == 0 or bool(torch.stack([torch.isfinite(x).all() for x in present]).all()):
        return run(q, k, v, g, beta, scale, initial_state, chunk_size, group_size=group_size)

    def rows(x: Optional[torch.Tensor]) -> torch.Tensor:  # [B, T, H]: a non-finite entry at (b, t, h)
        if x is None:
            return torch.zeros(q.shape[:3], dtype=torch.bool, device=q.device)
        bad = ~torch.isfinite(x)
        return bad.flatten(3).any(-1) if bad.dim() > 3 else bad

    def clean(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))

    reached = (rows(k) | rows(v) | rows(g) | rows(beta)).cumsum(1) > 0  # [B, T, H]: at or after a bad token
    if initial_state is not None:
        reached = reached | (~torch.isfinite(initial_state)).flatten(2).any(-1)[:, None, :]
    o, S = run(clean(q), clean(k), clean(v), clean(g), clean(beta), scale, clean(initial_state), chunk_size,
               group_size=group_size)
    o = o.masked_fill((reached | rows(q))[..., None], float("nan"))
    return o, S.masked_fill(reached[:, -1, :, None, None], float("nan"))


def _chunk_engine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    scale: float,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    *,
    group_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunk_forward` on finite inputs (the engine of the module docstring)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q.dtype)
    C = chunk_size
    N = -(-T // C)
    G = state_group_size(N) if group_size is None else group_size
    ng = -(-N // G)
    Np = ng * G  # chunks, padded to whole groups
    qc = _to_chunks(q, C, Np, dt) * scale  # [B, H, Np, C, K]
    kc = _to_chunks(k, C, Np, dt)
    vc = _to_chunks(v, C, Np, dt)  # [B, H, Np, C, V]

    b = None if g is None else _to_chunks(g, C, Np, dt).cumsum(3)  # [B, H, Np, C(, K)]
    if b is None:
        q_in, k_out, ell = qc, kc, None
    else:
        bk = b if b.dim() == 5 else b[..., None]  # broadcastable against [..., C, K]
        last = bk[..., -1:, :]  # [B, H, Np, 1, K or 1]
        q_in = qc * bk.exp()  # reads the entering state
        k_out = kc * (last - bk).exp()  # writes the leaving state
        ell = last[..., 0, :]  # [B, H, Np, K or 1]: log decay across each chunk

    factors = halving_factors(b) if b is not None and b.dim() == 5 else None  # shared by A and M
    A = decay_scores(qc, kc, b, strict=False, factors=factors)  # [B, H, Np, C, C]
    S0 = None if initial_state is None else initial_state.to(dt)

    if beta is None:
        U = k_out.transpose(-1, -2) @ vc  # [B, H, Np, K, V], all chunks at once
        L, lamx, E = _decay_scan(U, ell, S0, G)
        q_grp = q_in if lamx is None else q_in * lamx.exp()[..., None, :]  # decayed from the group's start
        entering = (q_grp.view(B, H, ng, G * C, K) @ E[:, :, :ng]).view(B, H, Np, C, V)
        o = _affine(A, vc, _affine(q_in, L, entering))  # entering + q_in @ L + A @ v
        S = E[:, :, ng]
    else:
        bc = _to_chunks(beta, C, Np, dt)[..., None]  # [B, H, Np, C, 1]
        M = bc * decay_scores(kc, kc, b, strict=True, factors=factors)
        k_w = kc if b is None else kc * bk.exp()
        rhs = torch.cat([bc * vc, bc * k_w], dim=-1)  # [B, H, Np, C, V + K]
        sol = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)
        u0, W = sol.split([V, K], dim=-1)
        k_t = k_out.transpose(-1, -2)
        P = k_t @ -W  # [B, H, Np, K, K]: transition across each chunk, diag(decay) - k_out^T W
        P.diagonal(dim1=-2, dim2=-1).add_(1.0 if ell is None else ell.exp())
        Sin, S = _TransitionScan.apply(P, k_t @ u0, S0, G)
        u = torch.baddbmm(u0.flatten(0, 2), W.flatten(0, 2), Sin.flatten(0, 2), alpha=-1).view_as(u0)  # u0 - W S
        o = _affine(A, u, q_in @ Sin)
    o = o.reshape(B, H, Np * C, V)
    if Np * C > T:
        o = o[:, :, :T]
    o = o.transpose(1, 2)
    return o.to(q.dtype), S


# --- torch.compile (opt-in) -------------------------------------------------------------------

_compiled: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
_compile_failed: set[str] = set()


def engine_for(x: torch.Tensor) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`chunk_forward`, or its `torch.compile(dynamic=False)` twin when the environment variable
    ATTNKIT_LINEAR_COMPILE is set ("1": inductor; any other value: that torch.compile backend)
    and x is on CUDA. Eager fusion is what the engine lacks on a GPU (many small elementwise
    kernels); dynamo caches one graph per shape. Falls back to eager, with one warning, if
    compiling fails."""
    settings = config.get()
    choice = settings.linear_compile
    if choice in ("", "0") or x.device.type not in settings.linear_compile_devices:
        return chunk_forward
    backend = "inductor" if choice == "1" else choice
    if backend in _compile_failed:
        return chunk_forward
    if backend not in _compiled:
        _compiled[backend] = _with_fallback(backend)
    return _compiled[backend]


def _with_fallback(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def fail(e: Exception) -> None:
        _compile_failed.add(backend)
        warnings.warn(f"attnkit.linear: torch.compile backend {backend!r} failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the eager chunked form", RuntimeWarning, stacklevel=3)

    try:
        compiled = torch.compile(_chunk_engine, dynamic=False, backend=backend)
    except Exception as e:  # an unknown backend, a missing compiler
        fail(e)
        return chunk_forward

    def engine(*args, **kwargs):  # type: ignore[no-untyped-def]
        if backend not in _compile_failed:
            try:
                return compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # compile-time failures surface at the first call
                fail(e)
        return _chunk_engine(*args, **kwargs)

    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        return chunk_forward(*args, engine=engine, **kwargs)  # non-finite containment stays eager

    return run
