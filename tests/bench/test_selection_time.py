"""`select_ms`: the selection alone, timed per row for methods with a policy, absent (null) otherwise."""

from __future__ import annotations

import torch

import attnkit as ak
from attnkit.bench import report, selection_time
from attnkit.bench.runner import Config, Runner
from attnkit.bench.schema import validate
from attnkit.bench.workloads import Shape
from attnkit.core.contract import validate_attention
from attnkit.registry import get_method


def _run(methods: list[str]) -> dict:
    cfg = Config(preset="test", device=torch.device("cpu"), methods=methods, seqlens=[64], dtypes=[torch.float32],
                 workloads=["random"], shape=Shape(1, 4, 2, 16), warmup=1, repeats=2, budget_s=5.0,
                 overrides={"nsa": {"block_size": 8, "topk": 3, "window": 16}})
    runner = Runner(cfg, progress=False)
    runner.run()
    return runner.document("attnkit bench test")


def test_select_ms_present_for_selection_methods_absent_for_dense() -> None:
    doc = _run(["dense", "moba", "nsa", "sliding_window"])
    assert not validate(doc), validate(doc)[:5]
    rows = {r["method"]: r for r in doc["rows"]}
    for name in ("moba", "nsa"):
        r = rows[name]
        assert r["status"] == "ok", r["error"]
        assert isinstance(r["select_ms"], float) and r["select_ms"] > 0, f"{name}: select_ms {r['select_ms']!r}"
        assert not any("select_ms" in n for n in r["notes"]), r["notes"]
    for name in ("dense", "sdpa", "sliding_window"):  # no separate selection: absent, not zero
        assert rows[name]["status"] == "ok" and rows[name]["select_ms"] is None, (name, rows[name]["select_ms"])
    md = report.markdown(doc)
    header = next(line for line in md.splitlines() if line.startswith("| workload"))
    assert "select ms" in header.split(" | ")
    moba_line = next(line for line in md.splitlines() if "| moba |" in line)
    dense_line = next(line for line in md.splitlines() if "| dense |" in line)
    col = header.split(" | ").index("select ms")
    assert moba_line.split(" | ")[col] != "-" and dense_line.split(" | ")[col] == "-"
    assert "select ms" in report.terminal_table(doc).splitlines()[0]


def test_selection_fn_calls_each_policy_signature() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 32, 4, 8, generator=g), torch.randn(1, 32, 2, 8, generator=g)
    call = validate_attention(q, k, k, causal=True)
    # NSA: policy(call, block_size, topk), filled by name from the options (gates are not selection inputs)
    nsa_opts = {"block_size": 4, "topk": 3, "g_slc": torch.ones(1, 32, 4)}
    got = selection_time.selection_fn(get_method("nsa"), call, nsa_opts)()
    want = ak.methods.nsa.select(q, k, block_size=4, topk=3)
    assert torch.equal(got.indices, want.indices)
    # MoBA: policy(call, opts) with the parsed options
    got = selection_time.selection_fn(get_method("moba"), call, {"block_size": 4, "topk": 2})()
    assert torch.equal(got.indices, ak.methods.moba.select(q, k, block_size=4, topk=2).indices)
    for name, opts in (("dense", {}), ("sliding_window", {"window": 8})):
        assert selection_time.selection_fn(get_method(name), call, opts) is None, name


def test_checkpoint_after_every_row() -> None:
    # a run killed mid-group (wall-clock limit, OOM crash) must keep every row measured so far
    seen: list[int] = []
    cfg = Config(preset="test", device=torch.device("cpu"), methods=["dense", "moba"], seqlens=[32, 64],
                 dtypes=[torch.float32], workloads=["random"], shape=Shape(1, 2, 1, 8), warmup=1, repeats=1,
                 budget_s=5.0)
    runner = Runner(cfg, progress=False, checkpoint=lambda doc: seen.append(len(doc["rows"])))
    rows = runner.run()
    assert seen == list(range(1, len(rows) + 1)), f"checkpoints after {seen} rows, expected one per row ({len(rows)})"
    assert all(r["speedup"] is not None for r in rows if r["time_ms"]), "every timed row gets its ratio to SDPA"
