"""Properties of every KV policy (`attnkit.kv.POLICIES`) and sparse-decode reader (`Reader`'s
subclasses), against the float64 oracle over the kept tokens:

- a full budget (ratio 1.0) changes nothing: prefill and decode equal dense decoding;
- any budget is held: after prefill every head keeps at most its target (plus a compensation token
  where the policy adds one), and policies that evict while decoding hold it at every step;
- a reader whose budget covers the whole cache equals dense decoding, at every step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st

from attnkit.core.contract import OptionError
from attnkit.kv import POLICIES, KVSession, Reader, get_policy
from tests.conftest import assert_close64
from tests.kv.helpers import oracle_over_kept

from .conftest import fuzz

# a reader's options that cover the whole cache; SANTA is an estimator (random samples), never exact
FULL_READERS = {"quest": dict(topk=10**6), "recycled": dict(topk=10**6),
                "routed": dict(method="moba", options=dict(block_size=4, topk=10**6))}
ESTIMATORS = {"santa": "tests/kv/test_sparse.py::test_santa_is_seeded_and_unbiased"}


@st.composite
def prompts(draw):  # type: ignore[no-untyped-def]
    B, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    T, steps = draw(st.integers(2, 30)), draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mk = lambda t, h: torch.randn(B, t, h, 8, generator=g, dtype=torch.float64)  # noqa: E731
    prompt = (mk(T, hkv * group), mk(T, hkv), mk(T, hkv))
    tokens = [(mk(1, hkv * group), mk(1, hkv), mk(1, hkv)) for _ in range(steps)]
    return prompt, tokens, draw(st.sampled_from([1, 2, 4]))


def _run(session: KVSession, prompt, tokens):  # type: ignore[no-untyped-def]
    yield session.prefill(0, *prompt), prompt[0]
    for q, k, v in tokens:
        yield session.step(0, q, k, v), q


@pytest.mark.parametrize("name", sorted(POLICIES))
@given(case=prompts())
@fuzz()
def test_full_budget_policy_equals_dense(name, case):
    prompt, tokens, page = case
    try:
        policy = get_policy(name, budget=1.0)
    except OptionError:
        reject()
    dense = KVSession(None, page_size=page)
    for (out, q), (want, _) in zip(_run(KVSession(policy, page_size=page), prompt, tokens), _run(dense, prompt, tokens)):
        assert_close64(out, want, f"{name} with budget 1.0", rtol=1e-12)


@pytest.mark.parametrize("name", sorted(POLICIES))
@given(case=prompts(), budget=st.one_of(st.integers(1, 32), st.floats(0.05, 1.0)), data=st.data())
@fuzz()
def test_budgets_are_held(name, case, budget, data):
    prompt, tokens, page = case
    try:
        policy = get_policy(name, budget=budget)
    except OptionError:
        reject()
    s = KVSession(policy, page_size=page)
    extra = int(bool(getattr(policy, "compensation", False)))  # RazorAttention's mean token
    try:
        s.prefill(0, *prompt)
    except OptionError:
        reject()  # a ratio too small for this prompt (e.g. below SnapKV's observation window): a clear error
    s = KVSession(policy, page_size=page)
    for i, (out, q) in enumerate(_run(s, prompt, tokens)):
        c = s.cache.layer(0)
        if i > 0 and not policy.evicts_on_decode:
            break  # the budget applies to the prompt; decoded tokens are appended
        target = c.state["target"]
        kept = c.num_kept()
        assert (kept <= target + extra).all(), f"{name} budget {budget!r}: kept {kept.tolist()} > {target.tolist()}"
        if i > 0:
            assert_close64(out, oracle_over_kept(q, c), f"{name} decode over the kept tokens", rtol=1e-10)


@pytest.mark.parametrize("reader", sorted(r.name for r in Reader.__subclasses__()))
@given(case=prompts(), stride=st.integers(1, 3))
@fuzz()
def test_reader_with_a_full_budget_equals_dense(reader, case, stride):
    if reader in ESTIMATORS:
        return  # an unbiased estimator, not attention over a subset: tested by its own statistics
    assert reader in FULL_READERS, f"reader {reader!r}: add its full-budget options to FULL_READERS"
    cls = next(r for r in Reader.__subclasses__() if r.name == reader)
    opts = dict(FULL_READERS[reader], **({"stride": stride} if reader == "recycled" else {}))
    prompt, tokens, page = case
    s = KVSession(None, cls(**opts), page_size=page)
    for i, (out, q) in enumerate(_run(s, prompt, tokens)):
        if i > 0:
            assert_close64(out, oracle_over_kept(q, s.cache.layer(0)), f"{reader} with a full budget", rtol=1e-10)
