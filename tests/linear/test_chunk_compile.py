"""The opt-in torch.compile path of the chunked engine (ATTNKIT_LINEAR_COMPILE).

Nothing compiles unless asked: the default and CPU tensors always get the eager engine. The
compiled path is exercised here on CPU with the `aot_eager` backend (dynamo + AOTAutograd
tracing of forward and backward, no code generation), which is what the GPU path runs through
before inductor.
"""

from __future__ import annotations

import pytest
import torch

import attnkit.linear.chunk as chunk
from attnkit import config
from tests.conftest import assert_close64

from .cases import grad_keys, make_inputs, run


@pytest.fixture
def compile_on_cpu(monkeypatch: pytest.MonkeyPatch, config_override):  # type: ignore[no-untyped-def]
    config_override(linear_compile_devices=("cpu", "cuda"))
    monkeypatch.setattr(chunk, "_compiled", {})
    monkeypatch.setattr(chunk, "_compile_failed", set())
    yield config_override
    torch._dynamo.reset()


def test_eager_unless_asked(config_override) -> None:
    q = torch.zeros(1, 2, 1, 4)
    assert config.from_env({}).linear_compile == ""
    config_override(linear_compile="")
    assert chunk.engine_for(q) is chunk.chunk_forward
    config_override(linear_compile="0")
    assert chunk.engine_for(q) is chunk.chunk_forward
    config_override(linear_compile="1")
    assert chunk.engine_for(q) is chunk.chunk_forward  # CPU tensors: never compiled


@pytest.mark.parametrize("name", ["gla", "kda"])
def test_compiled_engine_equals_recurrent(compile_on_cpu, name: str) -> None:
    compile_on_cpu(linear_compile="aot_eager")
    x = make_inputs(name, B=1, T=40, H=2, K=4, V=3, requires_grad=True)
    keys = grad_keys(x)
    o_ref, s_ref = run(name, x, backend="reference")
    g_ref = torch.autograd.grad(o_ref.sum() + s_ref.square().sum(), [x[k] for k in keys])
    o, s = run(name, x, backend="chunk", chunk_size=8)
    g = torch.autograd.grad(o.sum() + s.square().sum(), [x[k] for k in keys])
    assert "aot_eager" in chunk._compiled and not chunk._compile_failed
    assert_close64(o, o_ref, f"{name} compiled output")
    assert_close64(s, s_ref, f"{name} compiled final state")
    for key, a, b in zip(keys, g, g_ref):
        assert_close64(a, b, f"{name} compiled d{key}", rtol=1e-8)


def test_compile_failure_falls_back_to_eager(compile_on_cpu) -> None:
    compile_on_cpu(linear_compile="no_such_backend")
    x = make_inputs("simple_gla", B=1, T=20, H=1, K=4, V=3)
    o_ref, s_ref = run("simple_gla", x, backend="reference")
    with pytest.warns(RuntimeWarning, match="no_such_backend"):
        o, s = run("simple_gla", x, backend="chunk", chunk_size=8)
    assert_close64(o, o_ref, "fallback output")
    assert_close64(s, s_ref, "fallback final state")
    assert chunk.engine_for(x["q"]) is chunk.chunk_forward  # no second attempt
