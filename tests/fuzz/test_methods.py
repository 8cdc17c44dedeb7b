"""Properties of every registered method (the registry is iterated: a new method is fuzzed as soon as
it is registered), against float64 oracles written from the definitions:

- agreement with the oracle: softmax methods against the naive float64 attention over the very
  visibility (mask or selection) the method used, float32 within DESIGN.md's 2x rule; linear methods
  (chunked form) against the float64 recurrence;
- causality: changing keys and values a query cannot see (the future) leaves its row bitwise unchanged;
- rows that see nothing (causal, Tq > Tk) give 0 and LSE -inf;
- non-finite containment: a NaN or inf in a future key or value, or in another varlen sequence,
  leaves every row that cannot see it bitwise unchanged.

A method whose selection is estimated from the whole prompt (`Capabilities.selection_reads_whole_prompt`)
may change which earlier keys a row attends when a future key changes; for it, causality and
containment say instead that every row that cannot see the changed key stays finite and equals
attention, over the keys it may see, under the selection the method actually used.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit as ak
from attnkit import registry
from attnkit.core.contract import AttnkitError, validate_attention
from tests.conftest import assert_close64, assert_close_rule

from .conftest import fuzz
from .strategies import Case, captured_visibility, cases, linear_oracle, run_seen, softmax_oracle

METHODS = registry.methods()
# methods whose output mixes several softmax passes, with the test that holds them to their own oracle
COMPOSITE = {"nsa": "tests/methods/test_nsa.py (three gated branches against a float64 oracle)"}
ids = [m.name for m in METHODS]


def _split(result):  # type: ignore[no-untyped-def]
    return result if isinstance(result, tuple) else (result, None)


def _clean_rows(case: Case, p: int) -> int:
    """How many leading rows cannot see key `p` (causal, no varlen). A block-level selection
    (`q_block > 1`: pooled queries, e.g. block top-k) decides for a whole query block at once, from
    what the block's last query may see, so a row is clean when its whole query block is before `p`."""
    with captured_visibility() as seen:
        case.run()
    sel = seen.get("selection")
    qb = sel.q_block if sel is not None else 1
    shift = case.q.shape[1] - case.k.shape[1]  # row r sits at key position r - shift
    rows = max(0, shift + p)
    return (rows // qb) * qb if qb > 1 else rows


def _assert_attention_under_used_selection(spec, case: Case, out: torch.Tensor,  # type: ignore[no-untyped-def]
                                           seen, clean: slice) -> None:
    """Rows `clean` of `out` (a run on changed future keys / values, whose visibility is `seen`) are
    finite and equal the oracle over the case's own keys under that visibility: what they read
    is only keys they may see, whatever selection the changed prompt led to."""
    got = out[:, clean]
    assert torch.isfinite(got).all(), f"{spec.name}: a non-finite value reached a row that cannot see it"
    o64, _ = softmax_oracle(case, seen)
    if case.q.dtype == torch.float64:
        assert_close64(got, o64[:, clean], f"{spec.name} rows before the change")
    else:
        ob, _ = softmax_oracle(case, seen, compute_dtype=None)
        assert_close_rule(got, o64[:, clean], ob[:, clean], f"{spec.name} rows before the change")


def _first_future(case: Case) -> int:
    """Queries `0 .. Tq - Tk + p - 1` see only keys before `p`; returns a key position `p` (>= 1
    when possible) to perturb, in the second half of the keys."""
    return max(1, case.k.shape[1] // 2) if case.k.shape[1] > 1 else 0


@pytest.mark.parametrize("spec", METHODS, ids=ids)
@given(data=st.data())
@fuzz()
def test_matches_the_float64_oracle(spec, data):
    case = data.draw(cases(spec))
    if spec.family == "linear":
        out, _ = _split(case.run())
        want, _ = _split(linear_oracle(case))
        rtol = 1e-9 if case.q.dtype == torch.float64 else 2e-4
        scale = max(1.0, want.abs().max().item())
        err = (out.double() - want).abs().max().item() if out.numel() else 0.0
        assert err <= rtol * scale, f"{spec.name}: chunked vs float64 recurrence {err:.3e} > {rtol:.0e} x {scale:.3g}"
        return
    result, seen = run_seen(spec, case, return_lse=spec.capabilities.lse, backend="reference")
    out, lse = _split(result)
    if spec.name in COMPOSITE:  # not one softmax over one visibility: held to its own oracle
        return
    if seen.get("calls", 0) == 0:
        assert spec.family == "exact" or spec.visibility is not None, (
            f"{spec.name}: its reference backend bypassed ops.executors and it declares no visibility")
    assert seen.get("calls", 0) <= 1, f"{spec.name}: ran {seen['calls']} softmax passes; add it to COMPOSITE"
    o64, l64 = softmax_oracle(case, seen)
    if case.q.dtype == torch.float64:
        assert_close64(out, o64, f"{spec.name} out")
        if lse is not None:
            assert_close64(lse, l64, f"{spec.name} lse")
    else:
        ob, lb = softmax_oracle(case, seen, compute_dtype=None)
        assert_close_rule(out, o64, ob, f"{spec.name} out")
        if lse is not None:
            assert_close_rule(lse, l64, lb, f"{spec.name} lse")
    auto, _ = _split(case.run())  # whatever dispatch picks on this machine agrees with the reference
    torch.testing.assert_close(auto, out, rtol=1e-5 if case.q.dtype == torch.float32 else 1e-10, atol=1e-5)


@pytest.mark.parametrize("spec", [m for m in METHODS if m.capabilities.causal], ids=lambda m: m.name)
@given(data=st.data())
@fuzz()
def test_future_keys_do_not_change_earlier_rows(spec, data):
    case = data.draw(cases(spec, causal=True, varlen=False))
    p = _first_future(case)
    rows = _clean_rows(case, p)  # queries whose aligned position (and query block) is before p
    if p == 0 or rows <= 0:
        return
    out, _ = _split(case.run())
    k, v = case.k.clone(), case.v.clone()
    k[:, p:] = torch.randn_like(k[:, p:]) * 3
    v[:, p:] = torch.randn_like(v[:, p:]) * 3
    result, seen = run_seen(spec, case, k=k, v=v)
    changed, _ = _split(result)
    if spec.capabilities.selection_reads_whole_prompt:
        _assert_attention_under_used_selection(spec, case, changed, seen, slice(0, rows))
        return
    assert torch.equal(changed[:, :rows], out[:, :rows]), f"{spec.name}: a row changed when only future keys did"


def _takes_queries_past_the_keys(spec) -> bool:  # type: ignore[no-untyped-def]
    """Whether the method accepts a causal call with Tq > Tk (its leading rows see nothing): `decode`
    may mean only one query against the keys (a prefill-only method's decode step)."""
    q, k = torch.zeros(1, 3, 1, 8), torch.zeros(1, 2, 1, 8)
    torch.manual_seed(0)
    try:
        ak.explain(q, k, k, method=spec.name, causal=True, **spec.example(validate_attention(q, k, k, causal=True)))
    except AttnkitError:
        return False
    return True


@pytest.mark.parametrize("spec", [m for m in METHODS if m.capabilities.causal and m.capabilities.decode
                                  and m.family != "linear" and _takes_queries_past_the_keys(m)],
                         ids=lambda m: m.name)
@given(data=st.data())
@fuzz(0.5)
def test_rows_that_see_nothing_give_zero_and_minus_inf(spec, data):
    case = data.draw(cases(spec, causal=True, varlen=False, tq_above_tk=True))
    out, lse = _split(case.run(return_lse=spec.capabilities.lse))
    blind = case.q.shape[1] - case.k.shape[1]  # aligned positions < 0: no key
    assert torch.equal(out[:, :blind], torch.zeros_like(out[:, :blind])), f"{spec.name}: blind rows not 0"
    if lse is not None:
        assert torch.isneginf(lse[..., :blind]).all(), f"{spec.name}: blind rows' LSE not -inf"


@pytest.mark.parametrize("spec", METHODS, ids=ids)
@given(data=st.data(), bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       where=st.sampled_from(["k", "v"]))
@fuzz()
def test_non_finite_values_stay_where_they_belong(spec, data, bad, where):
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    case = data.draw(cases(spec, causal=True if spec.capabilities.causal else None, dtypes=dtypes))
    T = case.k.shape[1]
    if case.lengths is not None and len([n for n in case.lengths if n]) > 1:
        # another sequence: the last non-empty one holds the bad entry, every earlier one must not see it
        starts = [sum(case.lengths[:i]) for i in range(len(case.lengths))]
        last = max(i for i, n in enumerate(case.lengths) if n)
        p, clean = starts[last] + data.draw(st.integers(0, case.lengths[last] - 1)), slice(0, starts[last])
        whole_prompt = False  # a selection is per sequence: another sequence's keys never change it
    elif case.causal and T > 1:
        whole_prompt = spec.capabilities.selection_reads_whole_prompt
        p = data.draw(st.integers(1, T - 1))
        clean = slice(0, _clean_rows(case, p))  # rows whose aligned position (and query block) is before p
    else:
        return  # every row may see every key: nothing to contain
    out, _ = _split(case.run())
    x = (case.k if where == "k" else case.v).clone()
    x[0, p, 0, data.draw(st.integers(0, x.shape[-1] - 1))] = bad
    result, seen = run_seen(spec, case, **{where: x})
    spoiled, _ = _split(result)
    if whole_prompt:
        _assert_attention_under_used_selection(spec, case, spoiled, seen, clean)
        return
    assert torch.equal(spoiled[:, clean], out[:, clean]), (
        f"{spec.name}: {bad} in {where} at key {p} changed rows that cannot see it "
        f"(first differing row {int((spoiled[:, clean] != out[:, clean]).flatten(2).any(-1).any(0).nonzero()[0])})")
