"""`attnkit.config`: variables read once, `override` scoped and checked, experimental variants shown
by `explain`."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import config


def test_from_env_reads_every_variable() -> None:
    env = {"ATTNKIT_SPARSE_KEYMAJOR": "0", "ATTNKIT_NO_AUTOTUNE": "1", "ATTNKIT_DECODE_BLOCK_N": "128",
           "ATTNKIT_DECODE_SPLITS": "8", "ATTNKIT_LINEAR_COMPILE": "aot_eager",
           "ATTNKIT_CACHE_DIR": "/tmp/x"}
    got = config.from_env(env)
    assert (got.sparse_keymajor, got.autotune, got.decode_block_n, got.decode_splits,
            got.linear_compile, got.cache_dir) == (False, False, 128, 8, "aot_eager", "/tmp/x"), got
    assert config.from_env({}) == config.Settings()
    with pytest.raises(ValueError, match="ATTNKIT_DECODE_SPLITS"):
        config.from_env({"ATTNKIT_DECODE_SPLITS": "many"})


def test_every_variable_is_documented() -> None:
    from pathlib import Path
    import re

    src = Path(config.__file__).read_text()
    doc = (Path(__file__).resolve().parents[1] / "docs" / "flags.md").read_text()
    names = set(re.findall(r'"(ATTNKIT_[A-Z_]+)"', src))
    assert names and all(f"`{n}`" in doc for n in names), sorted(n for n in names if f"`{n}`" not in doc)


def test_override_is_scoped_and_checked() -> None:
    before = config.get()
    with config.override(sparse_keymajor=False, decode_splits=4) as s:
        assert s is config.get() and not config.get().sparse_keymajor and config.get().decode_splits == 4
        with config.override(sparse_keymajor=True):
            assert config.get().sparse_keymajor and config.get().decode_splits == 4
        assert not config.get().sparse_keymajor
    assert config.get() == before
    with pytest.raises(TypeError, match="no_such_setting: not an attnkit setting"):
        with config.override(no_such_setting=1):
            pass
    assert config.get() == before


def test_routing_kernels_are_named_variants_in_explain() -> None:
    q = torch.randn(1, 16, 2, 8)
    exp = ak.explain(q, q, q, method="moba", block_size=4, topk=2)
    assert [(n, on) for n, on, _ in exp.variants] == [("routed_topk", False)], exp.variants
    assert "inputs are on cpu" in exp.variants[0][2] and "variant routed_topk: off" in str(exp)
    with config.override(routed_topk_devices=()):
        exp = ak.explain(q, q, q, method="nsa", block_size=4, topk=2, g_slc=torch.ones(1, 16, 2))
    assert [(n, on) for n, on, _ in exp.variants] == [("routed_topk", False)], exp.variants
    assert "runs on no device" in exp.variants[0][2]