"""Triton decode kernel vs the reference, on given device/sizes. Run by tests/ops/test_decode.py:
in a subprocess with TRITON_INTERPRET=1 on the CPU (tiny shapes), or directly on a GPU (real sizes).
Prints one line per case and exits non-zero on the first failure."""

from __future__ import annotations

import copy
import sys

import torch

from attnkit.kv.paged import PagedLayerCache
from attnkit.kv.sparse import Quest, Recycled
from attnkit.ops.decode import decode_attention

TINY = [  # B, T, Hq, Hkv, D, page, Tq, dtype
    (2, 40, 4, 2, 16, 4, 1, torch.float32),
    (1, 70, 2, 2, 32, 16, 2, torch.float32),
    (2, 50, 4, 1, 16, 8, 1, torch.bfloat16),
    (1, 45, 3, 3, 16, 12, 1, torch.float16),
]
LARGE = [
    (2, 4096, 32, 8, 128, 16, 1, torch.bfloat16),
    (1, 8192, 8, 1, 64, 64, 3, torch.float16),
    (2, 3000, 16, 4, 128, 16, 1, torch.float32),
]


def _errors(out, lse, q, c, sel):
    """Kernel error and same-dtype PyTorch error against the float64 reference (DESIGN.md's 2x rule)."""
    c64 = copy.copy(c)  # the same page table and positions, keys and values in float64
    c64.dtype, c64.k_pool, c64.v_pool, c64.bias_pool = torch.float64, c.k_pool.double(), c.v_pool.double(), \
        c.bias_pool.double()
    ref, ref_lse = decode_attention(q.double(), c64, sel, backend="reference", return_lse=True)
    base = decode_attention(q, c, sel, backend="reference")  # same dtype, plain PyTorch
    err = (out.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    lse_err = (lse.double() - ref_lse).abs().max().item()
    return err, base_err, lse_err


def _quest_kernel_ok(q, c) -> bool:
    """Quest's page-score kernel equals the PyTorch form (which tests/kv checks against the definition),
    empty and unallocated pages included."""
    from attnkit.kernels.selection.quest import quest_page_scores
    from attnkit.kv.sparse import _group_queries

    kmin, kmax = c.page_bounds()
    qg = _group_queries(q, c.num_heads)
    first = (c.seen - q.shape[1]).view(-1, 1).expand(-1, c.num_heads).reshape(-1)
    got = quest_page_scores(q, kmin, kmax, c.page_table.view(c.rows, -1), c.page_newest(), c.seen, True)
    pt = c.page_table.long().view(c.rows, -1)
    lo, hi = kmin[pt.clamp_min(0)].float(), kmax[pt.clamp_min(0)].float()  # the definition, term by term
    direct = torch.maximum(qg.reshape(c.rows, -1, 1, qg.shape[-1]) * lo.unsqueeze(1),
                           qg.reshape(c.rows, -1, 1, qg.shape[-1]) * hi.unsqueeze(1)).sum(-1).amax(1)
    empty = (pt < 0) | torch.isinf(lo).all(-1)
    pos = c.pos_pool[pt.clamp_min(0)]  # [R, maxp, ps]: the newest pages are read whatever their bound
    direct = direct.masked_fill((pos >= first.view(-1, 1, 1)).any(-1), float("inf"))
    direct = direct.masked_fill(empty, float("-inf"))
    same_inf = torch.equal(torch.isinf(got), torch.isinf(direct))
    finite = torch.isfinite(direct)
    err = (got - direct)[finite].abs().max().item()
    ok = same_inf and torch.equal(got[~finite], direct[~finite]) and \
        err <= 1e-4 * (1 + direct[finite].abs().max().item())
    print(f"quest page scores ({c.rows} rows x {pt.shape[1]} pages): err {err:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def run(cases, device: str) -> int:
    torch.manual_seed(0)
    for B, T, Hq, H, D, ps, Tq, dt in cases:
        c = PagedLayerCache(B, H, D, page_size=ps, dtype=dt, device=device)
        k = torch.randn(B, T, H, D, device=device).to(dt)
        v = torch.randn(B, T, H, D, device=device).to(dt)
        c.append(k, v)
        c.evict(torch.tensor([[[3, 5, 7, ps + 1]] * H] * B, device=device))  # holes, one page partly freed
        q = torch.randn(B, Tq, Hq, D, device=device).to(dt)
        if not _quest_kernel_ok(q, c):
            return 1
        rec = Recycled(stride=2, topk=9)
        rec.select(q, c, D ** -0.5)
        for name, sel in (("dense", None), ("quest", Quest(topk=3).select(q, c, D ** -0.5)),
                          ("tokens", rec.select(q, c, D ** -0.5))):
            out, lse = decode_attention(q, c, sel, backend="triton", return_lse=True)
            err, base, lse_err = _errors(out, lse, q, c, sel)
            eps = torch.finfo(dt).eps
            ok = err <= 2 * base + 8 * eps and lse_err <= 1e-3 * max(1.0, T ** 0.5)
            print(f"{name:7s} B={B} T={T} Hq={Hq} Hkv={H} D={D} page={ps} Tq={Tq} {dt}: err {err:.2e} "
                  f"(PyTorch {base:.2e}), lse {lse_err:.2e} {'ok' if ok else 'FAIL'}")
            if not ok:
                return 1
    return 0


if __name__ == "__main__":
    size = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    sys.exit(run(TINY if size == "tiny" else LARGE, "cpu" if size == "tiny" else "cuda"))
