"""`attnkit.explain` for the linear family called directly: the forms (fla, chunk, reference) are
backends of the one dispatcher, every form's reasons are listed, and the answer is what the call runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkit as ak
import attnkit.linear as L


def _inputs(K: int = 8):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, K, generator=g) for _ in range(3))
    gate = F.logsigmoid(torch.randn(1, 12, 2, K, generator=g)) / 16
    beta = torch.sigmoid(torch.randn(1, 12, 2, generator=g))
    return q, k, v, gate, beta


def test_explain_gla_lists_every_form_and_matches_the_run() -> None:
    q, k, v, g, _ = _inputs()
    exp = ak.explain(q, k, v, method="linear.gla", g=g, chunk_size=4)
    assert exp.method == "linear.gla" and [r[0] for r in exp.rows] == ["fla", "chunk", "reference"], str(exp)
    fla_reason = exp.rows[0][2]
    assert not exp.rows[0][1] and ("not installed" in fla_reason or "runs on cuda" in fla_reason), fla_reason
    assert exp.chosen == "chunk" and exp.rows[2][:2] == ("reference", True), str(exp)
    assert L.explain("gla", q, k, v, g, chunk_size=4).rows == exp.rows  # the family's own spelling
    o, _ = L.gla(q, k, v, g, chunk_size=4)
    want, _ = L.gla(q, k, v, g, chunk_size=4, backend=exp.chosen)
    assert torch.equal(o, want)


def test_explain_requested_form_and_float64() -> None:
    q, k, v, g, beta = _inputs()
    q, k, v, g, beta = (t.double() for t in (q, k, v, g, beta))
    exp = ak.explain(q, k, v, method="linear.kda", g=g, beta=beta, backend="reference",
                     use_qk_l2norm_in_kernel=True)
    assert exp.chosen == "reference" and exp.rows[1] == ("chunk", True, "supported, not chosen (another backend "
                                                         "was requested)"), str(exp)
    if exp.rows[0][2].startswith("runs on"):  # fla installed: every reason is listed, fp64 among them
        assert "fp64" in exp.rows[0][2], exp.rows[0][2]


def test_explain_validates_as_the_call_does() -> None:
    q, k, v, g, beta = _inputs()
    with pytest.raises(ak.AttnkitError, match="^op: expected one of"):
        ak.explain(q, k, v, method="linear.no_such_op")
    with pytest.raises(ak.AttnkitError, match="^beta: expected values in"):
        ak.explain(q, k, v, method="linear.delta_rule", beta=beta + 2)
    with pytest.raises(ak.AttnkitError, match=r"^backend: expected one of \['auto', 'fla', 'chunk', 'reference'\]"):
        ak.explain(q, k, v, method="linear.gla", g=g, backend="triton")
    with pytest.raises(ak.AttnkitError, match="^return_lse"):
        ak.explain(q, k, v, method="linear.gla", g=g, return_lse=True)
