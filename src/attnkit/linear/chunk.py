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
and all intra-chunk scores are computed for every chunk at once; only the state, `[K, V]` per
head, is carried through a loop over chunks.

Every exponent used is a difference `b_later - b_earlier <= 0`, so no factor can overflow
whatever the decay's strength. For per-channel decays the intra-chunk score
`sum_c q_ic k_jc exp(b_ic - b_jc)` does not factor into one matmul; it is computed in
sub-blocks of at most 16 tokens: blocks on the diagonal elementwise (`[s, s, K]`), blocks below
it as a matmul after rescaling both sides to the boundary between them (both factors <= 1).
No tensor larger than `C x C` per head and chunk is formed along the sequence.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import compute_dtype


def _to_chunks(x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...] in `dtype`, zero-padded to a multiple of C."""
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    N = -(-T // C)
    x = x.to(dtype).transpose(1, 2)
    if N * C != T:
        pad = x.new_zeros(B, H, N * C - T, *rest)
        x = torch.cat([x, pad], dim=2)
    return x.reshape(B, H, N, C, *rest)


def _causal_mask(n: int, strict: bool, device: torch.device) -> torch.Tensor:
    """[n, n] bool, True where key j may reach query i (j <= i, or j < i when strict)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _sub_block(C: int) -> int:
    """The largest divisor of C that is at most 16 (sub-block size for per-channel decays)."""
    return max(d for d in range(1, min(C, 16) + 1) if C % d == 0)


def decay_scores(a: torch.Tensor, c: torch.Tensor, b: Optional[torch.Tensor], strict: bool) -> torch.Tensor:
    """Causal intra-chunk scores `A_ij = sum_x a_ix c_jx exp(b_ix - b_jx)` for j <= i (j < i if strict).

    a, c: [..., C, K]; b: None (no decay), [..., C] (scalar decay) or [..., C, K] (per channel).
    Returns [..., C, C], zero above the diagonal (and on it when strict).
    """
    C = a.shape[-2]
    mask = _causal_mask(C, strict, a.device)
    s = a @ c.transpose(-1, -2)
    if b is None:
        return s.masked_fill(~mask, 0.0)
    if b.dim() == a.dim() - 1:
        diff = (b[..., :, None] - b[..., None, :]).masked_fill(~mask, float("-inf"))
        return s * diff.exp()
    return _vector_decay_scores(a, c, b, strict)


def _vector_decay_scores(a: torch.Tensor, c: torch.Tensor, b: torch.Tensor, strict: bool) -> torch.Tensor:
    lead, (C, K) = a.shape[:-2], a.shape[-2:]
    s = _sub_block(C)
    m = C // s
    a4, c4, b4 = (x.reshape(*lead, m, s, K) for x in (a, c, b))
    # diagonal sub-blocks, elementwise: [..., m, s(i), s(j), K]
    tri = _causal_mask(s, strict, a.device)[..., None]
    diff = (b4[..., :, None, :] - b4[..., None, :, :]).masked_fill(~tri, float("-inf"))
    diag = (a4[..., :, None, :] * c4[..., None, :, :] * diff.exp()).sum(-1)  # [..., m, s, s]
    if m == 1:
        return diag.reshape(*lead, C, C)
    # sub-blocks below the diagonal (query block I > key block J), rescaled to the end of J
    ref = b4[..., -1, :]  # [..., m, K]
    c_ref = c4 * (ref[..., None, :] - b4).exp()  # [..., J, s, K], factors <= 1
    lower = torch.ones(m, m, dtype=torch.bool, device=a.device).tril(-1)[:, :, None, None]
    e = (b4[..., :, None, :, :] - ref[..., None, :, None, :]).masked_fill(~lower, float("-inf"))
    a_ref = a4[..., :, None, :, :] * e.exp()  # [..., I, J, s, K], factors <= 1
    blocks = torch.einsum("...ijsk,...jtk->...ijst", a_ref, c_ref)  # [..., I, J, s, s]
    eye = torch.eye(m, dtype=a.dtype, device=a.device)[:, :, None, None]
    blocks = blocks + diag[..., :, None, :, :] * eye
    return blocks.transpose(-3, -2).reshape(*lead, C, C)


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: Optional[torch.Tensor],
    scale: float,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated linear attention (`beta is None`) or gated delta rule (`beta` given).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: None, [B, T, H] or [B, T, H, K] (log space);
    beta: None or [B, T, H]; initial_state: None or [B, H, K, V].
    Returns o: [B, T, H, V] in q's dtype and the final state [B, H, K, V] in float32
    (float64 for float64 inputs). Inputs are assumed validated.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q)
    C = chunk_size
    qc = _to_chunks(q, C, dt) * scale  # [B, H, N, C, K]
    kc = _to_chunks(k, C, dt)
    vc = _to_chunks(v, C, dt)  # [B, H, N, C, V]
    N = qc.shape[2]

    b = None if g is None else _to_chunks(g, C, dt).cumsum(3)  # [B, H, N, C(, K)]
    if b is None:
        q_in, k_out, decay = qc, kc, None
    else:
        bk = b if b.dim() == 5 else b[..., None]  # broadcastable against [..., C, K]
        last = bk[..., -1:, :]  # [B, H, N, 1, K or 1]
        q_in = qc * bk.exp()  # reads the entering state
        k_out = kc * (last - bk).exp()  # writes the leaving state
        decay = last.transpose(-1, -2).exp()  # [B, H, N, K or 1, 1]

    A = decay_scores(qc, kc, b, strict=False)  # [B, H, N, C, C]

    if beta is None:
        u = vc
        updates = k_out.transpose(-1, -2) @ vc  # [B, H, N, K, V], all chunks at once
    else:
        bc = _to_chunks(beta, C, dt)[..., None]  # [B, H, N, C, 1]
        M = bc * decay_scores(kc, kc, b, strict=True)
        k_w = kc if b is None else kc * bk.exp()
        rhs = torch.cat([bc * vc, bc * k_w], dim=-1)  # [B, H, N, C, V + K]
        sol = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)
        u0, W = sol[..., :V], sol[..., V:]

    S = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
    states, us = [], []
    for n in range(N):
        states.append(S)
        if beta is None:
            upd = updates[:, :, n]
        else:
            un = u0[:, :, n] - W[:, :, n] @ S  # [B, H, C, V]
            us.append(un)
            upd = k_out[:, :, n].transpose(-1, -2) @ un
        S = upd + (S if decay is None else decay[:, :, n] * S)
    if beta is not None:
        u = torch.stack(us, dim=2)
    Sin = torch.stack(states, dim=2)  # [B, H, N, K, V]
    o = q_in @ Sin + A @ u  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(q.dtype), S
