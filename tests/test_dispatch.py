"""Dispatch by measurement: the measured table reorders GPU backends for `backend="auto"`."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import attnkit.ops.dispatch as dispatch
import attnkit.ops.measured_dispatch as measured
from attnkit.core.contract import validate_attention
from attnkit.registry import Backend, Capabilities, MethodSpec, NoOptions, choose_backend

TABLE = {"device": "Fake GPU 80GB", "device_match": "Fake GPU", "source": "results/x.json",
         "entries": [{"method": "m", "min_t": 0, "max_t": 11585, "order": ["flex", "triton"], "evidence": "e1"},
                     {"method": "m", "min_t": 11586, "max_t": 2**31 - 1, "order": ["triton", "flex"],
                      "evidence": "e2"}]}


def _call(tk: int, device: str = "cuda") -> SimpleNamespace:
    return SimpleNamespace(device=torch.device(device, 0) if device == "cuda" else torch.device("cpu"), tk=tk)


def test_measured_order_by_device_method_and_length(monkeypatch):
    monkeypatch.setattr(measured, "TABLE", TABLE)
    monkeypatch.setattr(dispatch, "_device_name", lambda index: "Fake GPU 80GB")
    assert dispatch.measured_order("m", _call(4096))[0] == ["flex", "triton"]
    order, why = dispatch.measured_order("m", _call(65536))
    assert order == ["triton", "flex"] and "results/x.json" in why and "e2" in why
    assert dispatch.measured_order("other", _call(4096)) is None  # not measured: registry order
    assert dispatch.measured_order("m", _call(4096, "cpu")) is None
    monkeypatch.setattr(dispatch, "_device_name", lambda index: "Another GPU")
    assert dispatch.measured_order("m", _call(4096)) is None  # a device the table does not name


def test_differentiated_calls_follow_the_forward_backward_ranking(monkeypatch):
    table = {**TABLE, "entries": [{**TABLE["entries"][0], "order_train": ["triton", "flex"], "evidence_train": "t1"}]}
    monkeypatch.setattr(measured, "TABLE", table)
    monkeypatch.setattr(dispatch, "_device_name", lambda index: "Fake GPU 80GB")
    x = torch.zeros(1)
    call = SimpleNamespace(device=torch.device("cuda", 0), tk=4096, q=torch.zeros(1, requires_grad=True), k=x, v=x)
    order, why = dispatch.measured_order("m", call)
    assert order == ["triton", "flex"] and "forward+backward" in why and "t1" in why
    with torch.no_grad():  # inference: the forward ranking
        order, why = dispatch.measured_order("m", call)
    assert order == ["flex", "triton"] and "fastest forward in" in why
    call.q = torch.zeros(1)  # nothing requires grad
    assert dispatch.measured_order("m", call)[0] == ["flex", "triton"]


def test_choose_backend_follows_the_measurement(monkeypatch):
    run = lambda call, opts: None  # noqa: E731
    spec = MethodSpec("m", "sparse", "-", "-", NoOptions, Capabilities(),
                      (Backend("triton", run), Backend("flex", run), Backend("reference", run)))
    q = torch.randn(1, 8, 2, 4)
    call = validate_attention(q, q, q, causal=True)
    assert choose_backend(spec, call, None).chosen == "triton"  # no measurement: registry order
    monkeypatch.setattr(dispatch, "measured_order", lambda method, call: (["flex", "triton"], "measured: e1"))
    exp = choose_backend(spec, call, None)
    assert exp.chosen == "flex" and "measured: e1" in str(exp)
    assert choose_backend(spec, call, None, "triton").chosen == "triton"  # an explicit request wins


def test_committed_table_names_real_backends():
    from attnkit.registry import get_method

    assert measured.TABLE["entries"], "the committed table has measurements"
    for e in measured.TABLE["entries"]:
        names = {b.name for b in get_method(e["method"]).backends}
        assert set(e["order"]) <= names and e["min_t"] <= e["max_t"] and e["evidence"]
        assert set(e.get("order_train", e["order"])) == set(e["order"])


def test_declared_head_dim_packages_and_setting_are_reasons(monkeypatch):
    """A backend's largest head dim, required packages and turning-off setting are data that
    `why_not` reports, next to every other reason; the package checks live in `core.availability`."""
    from attnkit import config
    from attnkit.core import availability

    q = torch.randn(1, 4, 2, 16)
    call = validate_attention(q, q, q, return_lse=True)
    b = dispatch.Backend("b", lambda c, o: None, max_head_dim=8, lse=False)
    assert b.reasons(call, None) == ["head dim 16/16 > 8", "cannot return the LSE (return_lse=True)"]
    off = dispatch.Backend("off", lambda c, o: None, disabled_by="sparse_keymajor")
    assert off.why_not(call, None) is None
    with config.override(sparse_keymajor=False):
        assert "turned off by the setting sparse_keymajor=False" in off.why_not(call, None)
    assert set(availability.CHECKS) == {"triton", "flex", "fla", "cudnn"}
    monkeypatch.setitem(availability.CHECKS, "fla", lambda: "fla missing here")
    needs = dispatch.Backend("needs", lambda c, o: None, requires=("fla",), max_head_dim=8)
    assert needs.reasons(call, None) == ["fla missing here"]  # nothing else asked of what cannot load
    assert needs.unavailable() == "fla missing here"


def test_declared_block_multiple_is_a_reason():
    q = torch.randn(1, 4, 2, 16)
    call = validate_attention(q, q, q)
    b = dispatch.Backend("b", lambda c, o: None, block_multiple=128, blocks=lambda o: o)
    assert b.why_not(call, (128, 256)) is None
    assert b.why_not(call, (64, 128)) == "blocks 64/128 are not multiples of 128"
    assert b.why_not(call, None) == "block-level selections only, with blocks a multiple of 128"
