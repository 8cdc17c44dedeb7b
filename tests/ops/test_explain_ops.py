"""`attnkit.explain` for the executors called directly, and `attnkit info`: one dispatcher for every
entry point, every reason listed."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.cli import main


def _qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 24, 2, 8, generator=g) for _ in range(3))


def test_explain_sparse_attention_lists_every_backend_and_matches_the_run() -> None:
    q, k, v = _qkv()
    sel = ak.methods.moba.select(q, k, block_size=8, topk=2)
    exp = ak.explain(q, k, v, method="ops.sparse_attention", selection=sel)
    assert exp.chosen == "reference" and [r[0] for r in exp.rows] == ["triton", "flex", "reference"], str(exp)
    assert "chosen automatically on cuda only" in exp.rows[0][2], exp.rows[0][2]  # the CPU twin runs on request
    out = ak.ops.sparse_attention(q, k, v, sel)
    want = ak.ops.sparse_attention(q, k, v, sel, backend="reference")
    assert torch.equal(out, want)


def test_explain_dense_and_masked() -> None:
    q, k, v = _qkv()
    exp = ak.explain(q, k, v, method="ops.dense_attention", return_lse=True)
    assert exp.chosen == "reference" and exp.rows[0][:2] == ("sdpa", False) and "LSE" in exp.rows[0][2], str(exp)
    assert ak.explain(q, k, v, method="ops.dense_attention").chosen == "sdpa"
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    exp = ak.explain(q, k, v, method="ops.dense_attention", return_lse=True, cu_seqlens=cu)
    assert "LSE" in exp.rows[0][2] and "varlen" in exp.rows[0][2], exp.rows[0][2]  # every reason, not the first
    exp = ak.explain(q, k, v, method="ops.masked_attention", mask=ak.masks.sliding_window(4))
    assert exp.chosen == "reference", str(exp)
    with pytest.raises(ak.AttnkitError, match="^op: expected one of"):
        ak.explain(q, k, v, method="ops.no_such_op")
    with pytest.raises(ak.AttnkitError, match=r"^backend: expected one of \['auto', 'flex', 'reference'\]"):
        ak.ops.masked_attention(q, k, v, ak.masks.sliding_window(4), backend="triton")


def test_explain_decode_attention() -> None:
    from attnkit.kv.paged import PagedLayerCache

    cache = PagedLayerCache(1, 2, 8, page_size=4, dtype=torch.float32)
    k = torch.randn(1, 10, 2, 8)
    cache.append(k, k)
    q = torch.randn(1, 1, 4, 8)
    exp = ak.ops.explain("decode_attention", q, cache, return_lse=True)
    assert exp.chosen == "reference" and [r[0] for r in exp.rows] == ["triton", "sdpa", "reference"], str(exp)
    assert "LSE" in exp.rows[1][2]
    assert ak.ops.explain("decode_attention", q, cache).chosen == "sdpa"
    out, lse = ak.ops.decode_attention(q, cache, return_lse=True)
    want = ak.ops.dense_attention(q, k, k, return_lse=True, backend="reference")
    assert (out - want[0]).abs().max().item() < 1e-5 and (lse - want[1]).abs().max().item() < 1e-5


def test_info_prints_every_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for spec in ak.registry.methods():
        assert f"method {spec.name}\n" in out, spec.name
    assert "ops.sparse_attention" in out and "yes reference" in out
    if not torch.cuda.is_available():
        assert "no  triton" in out and "needs cuda" in out
