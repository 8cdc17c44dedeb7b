"""A selection registered outside the package (the example of docs/custom_selection.md) runs through
`attention()`, `explain()`, `attnkit bench` and sparse decoding."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit as ak
from attnkit.core.oracle import naive_attention
from attnkit.kv.sparse import Routed
from attnkit.registry import get_method, unregister

from .kv.helpers import random_cache

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_selection.md"
MODULE = "attnkit_user_selection_example"


def _example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, f"no python block in {DOC}"
    return blocks[0]


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("user")
    (root / f"{MODULE}.py").write_text(_example_code())
    sys.path.insert(0, str(root))
    try:
        import importlib

        mod = importlib.import_module(MODULE)
        yield root, mod
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(MODULE, None)
        unregister("strided_blocks")


def _visible(bs: int, stride: int):
    """The definition as a predicate over (batch, head, query position, key position)."""
    return lambda b, h, qpos, kpos: ((kpos // bs) == (qpos // bs)) | ((kpos // bs) % stride == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_and_explain(user_module, causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 21, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 29, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out = ak.attention(q, k, v, method="strided_blocks", causal=causal, block_size=4, stride=3)
    want = naive_attention(q, k, v, causal=causal, mask=_visible(4, 3))
    want = want[0] if isinstance(want, tuple) else want
    assert (out - want).abs().max().item() < 1e-10, f"max error {(out - want).abs().max().item()}"
    exp = ak.explain(q, k, v, method="strided_blocks", causal=causal, block_size=4, stride=3)
    assert exp.chosen == "reference", str(exp)
    rows = {name: (ok, why) for name, ok, why in exp.rows}
    assert set(rows) == {"triton", "reference"} and not rows["triton"][0], str(exp)
    with pytest.raises(ak.OptionError, match="^stride: expected an int >= 1"):
        ak.attention(q, k, v, method="strided_blocks", block_size=4, stride=0)
    assert get_method("strided_blocks").select is user_module[1].select


def test_routed_decoding(user_module) -> None:
    c, k, v = random_cache(T=33, page_size=4)
    q = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = Routed("strided_blocks", {"block_size": 4, "stride": 3}).attend(q, c, backend="reference")
    want = naive_attention(q, k, v, causal=True, mask=_visible(4, 3))
    want = want[0] if isinstance(want, tuple) else want
    assert (out - want).abs().max().item() < 1e-10, f"max error {(out - want).abs().max().item()}"


def test_bench_cli_imports_and_measures_it(user_module, tmp_path: Path) -> None:
    root, _ = user_module
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "attnkit", "bench", "--import", MODULE, "--methods", "strided_blocks",
           "--seqlens", "64", "--workloads", "random", "--repeats", "1", "--heads", "2", "--kv-heads", "1",
           "--head-dim", "16", "--no-progress", "--no-baselines", "--out", str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for r in doc["rows"] if r["method"] == "strided_blocks"]
    assert rows and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    r = rows[0]
    assert r["recall_source"] == f"{MODULE}.select", r["recall_source"]
    assert 0.0 < r["density"] < 1.0 and r["select_ms"] > 0, (r["density"], r["select_ms"])
    assert f"--import {MODULE}" in doc["command"], doc["command"]
