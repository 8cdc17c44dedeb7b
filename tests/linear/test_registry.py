"""`attnkit.attention(..., method=...)` and `attnkit.explain(...)` for each linear-family method."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
import attnkit.linear  # noqa: F401  (registers the family, in case attnkit/__init__ does not yet)
from attnkit.core.contract import AttnkitError, OptionError
from attnkit.registry import get_method

from tests.conftest import assert_close64

from .cases import METHODS, make_inputs, options, run


@pytest.mark.parametrize("name", METHODS)
def test_attention_dispatches_to_chunked_form(name: str) -> None:
    x = make_inputs(name, B=1, T=10)
    o = attnkit.attention(x["q"], x["k"], x["v"], method=name, **options(name, x))
    o_ref, _ = run(name, x, backend="reference", use_state=False)
    assert isinstance(o, torch.Tensor)
    assert_close64(o, o_ref, f"{name} via attnkit.attention")


@pytest.mark.parametrize("name", METHODS)
def test_attention_returns_state_and_takes_varlen(name: str) -> None:
    x = make_inputs(name, B=1, T=10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    h0 = torch.randn(2, 2, 8, 6, dtype=torch.float64)
    o, s = attnkit.attention(x["q"], x["k"], x["v"], method=name, cu_seqlens=cu, backend="reference",
                             initial_state=h0, output_final_state=True, chunk_size=3, **options(name, x))
    x["h0"] = h0
    o_ref, s_ref = run(name, x, backend="chunk", chunk_size=5, cu_seqlens=cu)
    assert_close64(o, o_ref, f"{name} varlen output via attention")
    assert_close64(s, s_ref, f"{name} varlen state via attention")


@pytest.mark.parametrize("name", METHODS)
def test_explain_names_every_backend(name: str) -> None:
    x = make_inputs(name, B=1, T=4, dtype=torch.float32)
    exp = attnkit.explain(x["q"], x["k"], x["v"], method=name, **options(name, x))
    rows = {row[0]: row for row in exp.rows}
    assert list(rows) == ["fla", "chunk", "reference"]
    assert exp.chosen == "chunk"  # CPU: fla cannot run
    assert not rows["fla"][1] and ("not installed" in rows["fla"][2] or "cuda" in rows["fla"][2])
    assert "chosen" in str(exp)


@pytest.mark.parametrize("name", METHODS)
def test_registry_row(name: str) -> None:
    spec = get_method(name)
    caps = spec.capabilities
    assert spec.family == "linear" and spec.docs == f"docs/methods/{name}.md"
    assert caps.causal and not caps.non_causal and caps.varlen and caps.decode and caps.backward
    assert not caps.lse and not caps.gqa
    assert dataclasses.fields(spec.options)


def test_attention_rejects_non_causal() -> None:
    x = make_inputs("gla", B=1, T=4)
    with pytest.raises(AttnkitError, match=r"^causal:"):
        attnkit.attention(x["q"], x["k"], x["v"], method="gla", causal=False, g=x["g"])


def test_attention_rejects_tq_ne_tk() -> None:
    x = make_inputs("linear_attention", B=1, T=4)
    with pytest.raises(OptionError, match=r"^k: linear-family methods need Tk == Tq"):
        attnkit.attention(x["q"][:, :1], x["k"], x["v"], method="linear_attention")


def test_attention_missing_gate() -> None:
    x = make_inputs("kda", B=1, T=4)
    with pytest.raises(OptionError, match=r"^g: method 'kda' needs g"):
        attnkit.attention(x["q"], x["k"], x["v"], method="kda", beta=x["beta"])


def test_attention_gate_checked_against_call() -> None:
    x = make_inputs("gated_delta_rule", B=1, T=4)
    with pytest.raises(OptionError, match=r"^g: expected"):
        attnkit.attention(x["q"], x["k"], x["v"], method="gated_delta_rule", g=x["g"][:, :2], beta=x["beta"])


def test_attention_option_range() -> None:
    x = make_inputs("linear_attention", B=1, T=4)
    with pytest.raises(OptionError, match=r"^chunk_size: expected an int >= 1"):
        attnkit.attention(x["q"], x["k"], x["v"], method="linear_attention", chunk_size=0)


def test_attention_unknown_option() -> None:
    x = make_inputs("gla", B=1, T=4)
    with pytest.raises(OptionError, match=r"^window: not an option"):
        attnkit.attention(x["q"], x["k"], x["v"], method="gla", g=x["g"], window=3)


def test_attention_rejects_gqa() -> None:
    x = make_inputs("linear_attention", B=1, T=4)
    with pytest.raises(AttnkitError, match=r"^k: method 'linear_attention' needs Hkv == Hq"):
        attnkit.attention(x["q"], x["k"][:, :, :1], x["v"][:, :, :1], method="linear_attention")
