"""Estimation steps shared by the training-free prefill methods (vertical-slash, XAttention,
FlexPrefill, Token Sparse Attention).

All work on a `SeqView` (per-sequence, padded under varlen; query row i at key position
`i + offset`) and stay on the inputs' device with no host sync:

- `last_query_probs`: the softmax attention of the last `n_last` queries of each sequence to every
  key, `[N, Hq, L, Tk]` (O(L x T), never T x T);
- `slash_sums`: that attention summed along diagonals (offset `d = i - j`), by a strided view;
- `coverage_keep`: per row, the smallest set of candidates (forced ones first, then by descending
  mass) whose cumulative mass reaches a fraction of the row's total;
- `bitmap_rows`: block-visibility rows (a chunk of query blocks) to a `KVSelection` index tensor of
  a static width;
- `block_candidates`: the candidate and forced (first, diagonal) key blocks of query blocks;
- `vertical_slash_table` / `vertical_slash_rows`: selected key columns and diagonals to the key
  blocks they touch, per query block.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..core.selection import KVSelection, cdiv
from ..core.topk import tile_budget
from .gemm import bmm_f32
from .router import SeqView

_BIG = 1 << 40


def query_lengths(view: SeqView) -> torch.Tensor:
    """Valid query rows per sequence `[N]` int64."""
    return view.k_len if view.packing is not None else torch.full_like(view.k_len, view.tq)


def block_span(view: SeqView, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last aligned key position of each query block: two `[N, nq]` int64 tensors
    (`last >= first`; blocks past a sequence's end keep a span of one position)."""
    nq = cdiv(view.tq, block)
    n = torch.arange(nq, device=view.q.device)
    first = (n * block + view.offset).unsqueeze(0).expand(view.q.shape[0], -1)
    last = torch.minimum((n + 1) * block, query_lengths(view).view(-1, 1)) - 1 + view.offset
    return first, torch.maximum(last, first)


def dense_selection(view: SeqView, block: int) -> KVSelection:
    """Every key block for every query block and head (the causal rule still applies token by token):
    the selection of a decode step, which these prefill methods serve with dense attention."""
    N, Tq, Hq, _ = view.q.shape
    nq, nk = cdiv(Tq, block), cdiv(view.tk, block)
    idx = torch.arange(nk, device=view.q.device, dtype=torch.int32).view(1, 1, 1, nk)
    return KVSelection(idx.expand(N, Hq, nq, nk).contiguous(), q_block=block, k_block=block)


def last_query_probs(view: SeqView, n_last: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention of each sequence's last `L = min(n_last, Tq, Tk)` queries to every key
    (with Tq > Tk, earlier queries sit before the first key and see nothing).

    Returns `(probs [N, Hq, L, Tk] float32/64, pos [N, L] int64)`: `pos` is each row's aligned key
    position (consecutive); rows before a sequence's start (a sequence shorter than L) are all 0."""
    q, k = view.q, view.k
    N, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G, L = Hq // Hkv, min(n_last, Tq, Tk)
    dev = q.device
    rows = query_lengths(view).view(-1, 1) - L + torch.arange(L, device=dev)  # [N, L]
    pos = rows + view.offset
    ql = q.gather(1, rows.clamp_min(0).view(N, L, 1, 1).expand(N, L, Hq, D))  # [N, L, Hq, D]
    a = ql.view(N, L, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(N * Hkv, G * L, D)
    b = k.permute(0, 2, 3, 1).reshape(N * Hkv, D, Tk)
    logits = (bmm_f32(a, b) * scale).view(N, Hkv, G, L, Tk).reshape(N, Hq, L, Tk)
    j = torch.arange(Tk, device=dev)
    vis = (j.view(1, 1, -1) <= pos.unsqueeze(-1)) & (j.view(1, 1, -1) < view.k_len.view(-1, 1, 1))
    vis = vis & (rows >= 0).unsqueeze(-1)  # [N, L, Tk]
    logits = logits.masked_fill(~vis.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.where(vis.unsqueeze(1), probs, torch.zeros((), dtype=probs.dtype, device=dev)), pos


def slash_sums(probs: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`probs [N, H, L, Tk]` of queries at consecutive positions `pos [N, L]` -> `[N, H, Tk]`: the
    mass on each diagonal offset `d = pos_i - j` (d in [0, Tk)).

    Row i's key `pos_i - d` sits at column `Tk + pos_0 - d + i` of the left-padded row `[0] * Tk ++
    probs[i]`; a view with row stride `2 Tk + 1` lines every diagonal up in one column."""
    N, H, L, Tk = probs.shape
    W, width = 2 * Tk, 2 * Tk - L + 1
    padded = torch.cat([torch.zeros_like(probs), probs], -1).contiguous()  # [N, H, L, 2 Tk]
    diag = padded.as_strided((N, H, L, width), (H * L * W, L * W, W + 1, 1)).sum(2)  # [N, H, width]
    x = Tk + pos[:, :1] - torch.arange(Tk, device=probs.device)  # [N, Tk]
    ok = (x >= 0) & (x < width)
    out = diag.gather(-1, x.clamp(0, width - 1).unsqueeze(1).expand(N, H, Tk))
    return torch.where(ok.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def coverage_keep(mass: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest set reaching `threshold` of each row's total mass: `[..., C]` -> bool `[..., C]`.

    Forced candidates are kept first and their mass counts; the other candidates follow by
    descending mass, each kept while the mass kept before it is below `threshold * total`."""
    zero = torch.zeros((), dtype=mass.dtype, device=mass.device)
    forced = forced & candidate
    total = torch.where(candidate, mass, zero).sum(-1, keepdim=True)
    base = torch.where(forced, mass, zero).sum(-1, keepdim=True)
    rest = torch.where(candidate & ~forced, mass.clamp_min(0), torch.full((), -1.0, dtype=mass.dtype, device=mass.device))
    sv, order = rest.sort(dim=-1, descending=True)
    pos_sv = sv.clamp_min(0)
    before = pos_sv.cumsum(-1) - pos_sv
    keep_sorted = (sv >= 0) & (base + before < threshold * total)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep | forced


def bitmap_rows(bitmap: torch.Tensor, width: int) -> torch.Tensor:
    """`[..., R, nk]` booleans -> int32 `[..., R, min(width, nk)]`: the set ids ascending, -1 padded.

    `width` must bound every row's count (static, so no host sync): callers pass a proven bound."""
    nk = bitmap.shape[-1]
    ids = torch.arange(nk, device=bitmap.device)
    key = torch.where(bitmap, ids, ids + nk)
    w = max(1, min(width, nk))
    top = key.sort(dim=-1).values[..., :w]
    return torch.where(top < nk, top, torch.full_like(top, -1)).to(torch.int32)


def row_chunks(nq: int, per_row: int, device: torch.device) -> Iterator[slice]:
    """Query-block chunks of at most `tile_budget(device)` working elements, `per_row` per query block."""
    step = max(1, tile_budget(device) // max(1, per_row))
    for r0 in range(0, nq, step):
        yield slice(r0, min(nq, r0 + step))


def block_candidates(first: torch.Tensor, last: torch.Tensor, k_len: torch.Tensor, block: int, nk: int,
                     causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For query blocks with spans `first/last [N, R]`: `(candidate, forced)` bool `[N, R, nk]`.

    A key block is a candidate when it exists and (causal) its first key is visible to the block's
    last query; forced are the first block and the diagonal blocks (those holding the block's own
    positions)."""
    m = torch.arange(nk, device=first.device).view(1, 1, -1)
    cand = m * block < k_len.view(-1, 1, 1)
    if causal:
        cand = cand & (m * block <= last.unsqueeze(-1))
    forced = (m == 0) | ((m >= (first // block).unsqueeze(-1)) & (m <= (last // block).unsqueeze(-1)))
    return cand, forced & cand


def vertical_slash_table(view: SeqView, cols: torch.Tensor, diags: torch.Tensor, block: int,
                         force_local: bool = False) -> Callable[[slice], torch.Tensor]:
    """Key blocks touched by the selected columns and diagonals: `bitmap(rows) -> [N, H, R, nk]` bool.

    `cols [N, H, Tk]` (key j selected), `diags [N, H, Tk]` (offset d = i - j selected). Query block n
    (positions `first..last`) keeps key block m when a selected column j in m satisfies `j <= last`,
    or when some position i of the block and selected d give `i - d` in m; with `force_local`, also
    the first block and its diagonal blocks.

    A diagonal d reaches, from every full query block n, the blocks `n + s` and (unless
    `(offset - d) % block == 0`) `n + s + 1`, with `s = floor((offset - d) / block)`: the shift does
    not depend on n, so per head one table over shifts (`need`: the smallest span a query block
    must have for the shift to be reached) serves every row."""
    N, H, Tk = cols.shape
    nk = cdiv(Tk, block)
    dev = cols.device
    off = view.offset
    j = torch.arange(nk * block, device=dev).view(1, 1, nk, block)
    colp = torch.nn.functional.pad(cols, (0, nk * block - Tk)).view(N, H, nk, block)
    first_col = torch.where(colp, j, torch.full((), _BIG, device=dev)).amin(-1)  # [N, H, nk]
    d = torch.arange(Tk, device=dev)
    shift = torch.div(off - d, block, rounding_mode="floor")  # [Tk]
    rho = (off - d) - shift * block
    s_min = (off - (Tk - 1)) // block
    U = (off // block + 1) - s_min + 1
    big = torch.full((), _BIG, dtype=torch.int64, device=dev)
    need = big.expand(N, H, U).clone()
    idx0 = (shift - s_min).view(1, 1, -1).expand(N, H, Tk)
    need.scatter_reduce_(-1, idx0, torch.where(diags, torch.zeros_like(big), big), reduce="amin")
    second = torch.where(diags & (rho != 0).view(1, 1, -1), (block - rho).view(1, 1, -1), big)
    need.scatter_reduce_(-1, idx0 + 1, second, reduce="amin")
    first, last = block_span(view, block)
    k_blocks = (view.k_len + block - 1) // block
    m = torch.arange(nk, device=dev)

    def bitmap(rows: slice) -> torch.Tensor:
        f, la = first[:, rows], last[:, rows]  # [N, R]
        R = f.shape[1]
        n = torch.arange(rows.start, rows.stop, device=dev)
        vis = first_col.unsqueeze(2) <= la.view(N, 1, R, 1)  # vertical: [N, H, R, nk]
        u = (m.view(1, -1) - n.view(-1, 1)) - s_min  # [R, nk]
        ok = (u >= 0) & (u < U)
        got = need.unsqueeze(2).expand(N, H, R, U).gather(-1, u.clamp(0, U - 1).view(1, 1, R, nk).expand(N, H, R, nk))
        vis = vis | (ok.view(1, 1, R, nk) & (got <= (la - f).view(N, 1, R, 1)))
        if force_local:
            vis = vis | block_candidates(f, la, view.k_len, block, nk)[1].unsqueeze(1)
        return vis & (m.view(1, 1, 1, -1) < k_blocks.view(N, 1, 1, 1))

    return bitmap


def vertical_slash_rows(view: SeqView, cols: torch.Tensor, diags: torch.Tensor, block: int, width: int) -> torch.Tensor:
    """`vertical_slash_table`'s key blocks as int32 rows `[N, H, nq, min(width, nk)]` (-1 padded)."""
    N, H, Tk = cols.shape
    nq, nk = cdiv(view.tq, block), cdiv(Tk, block)
    bitmap = vertical_slash_table(view, cols, diags, block)
    out = torch.empty(N, H, nq, max(1, min(width, nk)), dtype=torch.int32, device=cols.device)
    for rows in row_chunks(nq, N * H * nk * 8, cols.device):
        out[:, :, rows] = bitmap_rows(bitmap(rows), width)
    return out
