"""Streaming top-k (`core.topk`): equals `torch.topk` on the full matrix, whatever the tiles; honours
-inf (not a candidate), +inf (forced) and causal column limits; and keeps DSA selection at
T = 65536 under 1 GiB (measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.core.contract import AttnkitError
from attnkit.core import topk as topk_mod
from attnkit.core.topk import CUDA_TILE_BUDGET, TILE_BUDGET, streaming_topk, tile_budget, tile_sizes


def run(full: torch.Tensor, k: int, rc: int, cc: int, col_stop=None):
    calls = []

    def score(rows, cols):
        calls.append((rows, cols))
        return full[..., rows, cols]

    v, i = streaming_topk(score, full.shape[:-2], full.shape[-2], full.shape[-1], k, row_chunk=rc, col_chunk=cc,
                          col_stop=col_stop, dtype=full.dtype)
    return v, i, calls


@settings(max_examples=25)
@given(rows=st.integers(1, 20), cols=st.integers(1, 40), k=st.integers(1, 45), rc=st.integers(1, 8),
       cc=st.integers(1, 13), masked=st.floats(0, 0.9), seed=st.integers(0, 1000))
def test_equals_torch_topk_for_any_tiles(rows, cols, k, rc, cc, masked, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(2, rows, cols, generator=g, dtype=torch.float64)
    full = full.masked_fill(torch.rand(2, rows, cols, generator=g) < masked, float("-inf"))
    v, i, _ = run(full, k, rc, cc)
    width = min(k, cols)
    want_v, want_i = full.topk(width, dim=-1)
    assert v.shape == (2, rows, width) and i.dtype == torch.int32
    assert torch.equal(v, want_v), f"values differ by {float((v - want_v).nan_to_num().abs().max()):.3e}"
    finite = torch.isfinite(want_v)
    assert torch.equal(i[finite].long(), want_i[finite]), "indices of finite entries differ from torch.topk"
    assert bool((i[~finite] == -1).all()), "non-candidates (-inf) must be reported as -1"


def test_unordered_rows_hold_the_same_entries_with_one_sort_less():
    """`ordered=False` (callers that reorder by index) returns each row's same (value, index) pairs
    and calls `sort` once less: the dispatch mode counts the sorts."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(3)
    full = torch.randn(2, 9, 30, generator=g, dtype=torch.float64).masked_fill(
        torch.rand(2, 9, 30, generator=g) < 0.3, float("-inf"))
    seen: Counter = Counter()

    class Sorts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    out = {}
    for ordered in (True, False):
        seen.clear()
        with Sorts():
            out[ordered] = streaming_topk(lambda r, c: full[..., r, c], (2,), 9, 30, 5, row_chunk=4, col_chunk=7,
                                          dtype=full.dtype, ordered=ordered)
        out[ordered] += (seen["aten::sort"],)
    (v1, i1, sorts1), (v0, i0, sorts0) = out[True], out[False]
    assert sorts0 == sorts1 - 3, (sorts1, sorts0)  # one per row chunk (3 chunks of 4, 4, 1 rows)
    key = lambda v, i: sorted(zip(v.tolist(), i.tolist()))  # noqa: E731
    for r in range(2):
        for q in range(9):
            assert key(v0[r, q], i0[r, q]) == key(v1[r, q], i1[r, q]), f"row {r}, {q}"


def test_forced_columns_come_first_and_col_stop_skips_tiles():
    full = torch.randn(6, 30, dtype=torch.float64)
    full[:, 25] = float("inf")  # forced where visible
    full = full.masked_fill(torch.arange(30) >= 5 * (torch.arange(6).view(-1, 1) + 1), float("-inf"))
    causal_stop = lambda rows: rows.stop * 5  # noqa: E731  (row r sees columns < 5 (r + 1))
    v, i, calls = run(full, 3, 2, 4, col_stop=causal_stop)
    assert all(c.start < r.stop * 5 for r, c in calls), "a tile past col_stop was computed"
    for r in range(6):
        row = i[r].tolist()
        if 5 * (r + 1) > 25:
            assert row[0] == 25, f"row {r}: the forced column should come first, got {row}"
        else:
            assert 25 not in row, f"row {r}: column 25 is not visible yet was returned"
        want = sorted(full[r].topk(3).indices.tolist())
        assert sorted(row) == want, f"row {r}: {sorted(row)} != {want}"


def test_bad_arguments_raise():
    with pytest.raises(AttnkitError, match="^k: expected"):
        streaming_topk(lambda r, c: None, (), 3, 3, 0, row_chunk=1, col_chunk=1)
    with pytest.raises(AttnkitError, match="^col_chunk: expected"):
        streaming_topk(lambda r, c: None, (), 3, 3, 1, row_chunk=1, col_chunk=0)


def test_tile_sizes_respect_the_budget():
    r, c = tile_sizes(65536, 65536, elems_per_pair=6)
    assert c <= 4096 and r * c * 6 <= 1 << 22 and r >= 1
    assert tile_sizes(65536, 65536, elems_per_pair=6, device="cpu") == (r, c), "the CPU policy is the default"


def test_tile_sizes_per_device():
    assert tile_budget() == tile_budget("cpu") == TILE_BUDGET and tile_budget("cuda") == CUDA_TILE_BUDGET
    assert CUDA_TILE_BUDGET * 4 == 512 << 20, "a CUDA tile is 512 MiB of float32"
    # MoBA at T = 64K (block 64: 1024 key blocks, Hq = 16): every column in one tile, a handful of row tiles
    r, c = tile_sizes(65536, 1024, elems_per_pair=32, device="cuda")
    assert c == 1024 and r * c * 32 <= CUDA_TILE_BUDGET and -(-65536 // r) <= 32, (r, c)
    r_cpu, c_cpu = tile_sizes(65536, 1024, elems_per_pair=32, device="cpu")
    assert -(-65536 // r_cpu) >= 8 * -(-65536 // r), "CUDA tiles should be far larger than CPU tiles"
    # DSA at T = 64K (Hi = 4): a tile spans whole key rows, still within the budget
    r, c = tile_sizes(65536, 65536, elems_per_pair=6, device="cuda")
    assert c == 65536 and r * c * 6 <= CUDA_TILE_BUDGET and r >= 128, (r, c)
    # a row too wide for the budget is cut into columns rather than overflowing it
    r, c = tile_sizes(8, 1 << 30, elems_per_pair=2, device="cuda")
    assert r == 1 and c * 2 <= CUDA_TILE_BUDGET


@settings(max_examples=20)
@given(rows=st.integers(1, 60), k=st.integers(1, 12), rc=st.integers(1, 6), cc=st.integers(1, 70),
       budget=st.integers(1, 400), seed=st.integers(0, 1000))
def test_grown_rows_stay_in_budget_and_equal_topk(rows, k, rc, cc, budget, seed):
    cols = rows  # causal square: row r sees columns <= r
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(2, rows, cols, generator=g, dtype=torch.float64)
    full = full.masked_fill(torch.arange(cols) > torch.arange(rows).view(-1, 1), float("-inf"))
    calls = []

    def score(r, c):
        calls.append((r, c))
        return full[..., r, c]

    v, i = streaming_topk(score, (2,), rows, cols, k, row_chunk=rc, col_chunk=cc, col_stop=lambda r: r.stop,
                          dtype=full.dtype, max_tile_elems=budget)
    want_v, want_i = full.topk(min(k, cols), dim=-1)
    assert torch.equal(v, want_v)
    finite = torch.isfinite(want_v)
    assert torch.equal(i[finite].long(), want_i[finite])
    covered = sorted((r.start, r.stop) for r, c in calls if c.start == 0)
    assert covered[0][0] == 0 and covered[-1][1] == rows and all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    for r, c in calls:  # a grown chunk never exceeds the budget (a chunk of row_chunk rows may: it is the floor)
        n = r.stop - r.start
        assert n <= rc or n * (c.stop - c.start) <= budget, (r, c, budget)


_PROBE = textwrap.dedent("""
    import json, resource, time
    import torch
    import attnkit as ak

    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    torch.set_num_threads(2)
    T, Hi, Di, topk = 65536, 4, 32, 256
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 1, 8, generator=g)
    k = torch.randn(1, T, 1, 8, generator=g)
    q_idx = torch.randn(1, T, Hi, Di, generator=g)
    k_idx = torch.randn(1, T, Di, generator=g)
    w = torch.randn(1, T, Hi, generator=g)
    base = rss_now()
    t0 = time.perf_counter()
    sel = ak.methods.dsa.select(q, k, topk=topk, q_idx=q_idx, k_idx=k_idx, w=w)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # spot check the last query against a brute-force indexer row (one [1, T] row, not [T, T])
    i = T - 1
    row = (w[0, i].view(-1, 1) * torch.relu(q_idx[0, i] @ k_idx[0].T)).sum(0)
    want = row.topk(topk).values.min().item()
    got = row[sel.indices[0, 0, i].long()]
    print(json.dumps({"base": base, "peak": peak, "seconds": secs, "shape": list(sel.indices.shape),
                      "last_row_ok": bool((got >= want - 1e-4).all()), "last_row_full": int((sel.indices[0, 0, i] >= 0).sum())}))
""")


@pytest.mark.slow
def test_dsa_selection_at_64k_stays_under_one_gib():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, f"probe failed:\n{res.stderr[-2000:]}"
    m = json.loads(res.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    grew = m["peak"] - m["base"]
    assert m["shape"] == [1, 1, 65536, 256]
    assert m["last_row_ok"] and m["last_row_full"] == 256, f"last query's selection is not its top-256: {m}"
    # a [T, T] float32 score matrix alone would be 16 GiB
    assert grew < gib, f"DSA selection grew RSS by {grew / gib:.2f} GiB (>= 1 GiB); peak {m['peak'] / gib:.2f} GiB"
    assert m["peak"] < gib + m["base"], f"peak RSS {m['peak'] / gib:.2f} GiB"
    print(f"DSA T=65536 selection: +{grew / 2**20:.0f} MiB over inputs, peak RSS {m['peak'] / 2**20:.0f} MiB, "
          f"{m['seconds']:.1f} s")
