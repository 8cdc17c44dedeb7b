"""The runner's guards: budget prediction, the deadline, and errors (OOM included) recorded as rows."""

from __future__ import annotations

import torch

from attnkit.bench import baselines
from attnkit.bench.runner import Config, Runner
from attnkit.bench.schema import validate
from attnkit.bench.workloads import Shape

SMALL = Shape(1, 2, 1, 16)


def _config(**kw) -> Config:
    base = dict(preset="test", device=torch.device("cpu"), methods=["dense"], seqlens=[32], dtypes=[torch.float32],
                workloads=["random"], shape=SMALL, warmup=1, repeats=1, budget_s=10.0)
    base.update(kw)
    return Config(**base)


def test_row_predicted_over_budget_is_skipped_with_reason() -> None:
    runner = Runner(_config(seqlens=[32, 2048], max_run_s=1e-9), progress=False)
    rows = runner.run()
    long = [r for r in rows if r["T"] == 2048]
    assert long and all(r["status"] == "skipped" for r in long), [(r["method"], r["status"]) for r in long]
    assert all("predicted" in r["error"] and "--max-run-seconds" in r["error"] for r in long), long[0]["error"]
    assert all(r["status"] == "ok" for r in rows if r["T"] == 32)
    assert not validate(runner.document("attnkit bench test"))


def test_deadline_skips_remaining_rows() -> None:
    runner = Runner(_config(max_minutes=1e-9), progress=False)
    rows = runner.run()
    assert rows and all(r["status"] == "skipped" and "--max-minutes" in r["error"] for r in rows), rows


def test_out_of_memory_is_a_row_error_not_a_crash(monkeypatch) -> None:
    oom = getattr(torch, "OutOfMemoryError", RuntimeError)

    def make(q, k, v, causal, scale):
        def run():
            raise oom("CUDA out of memory. Tried to allocate 64.00 GiB")
        return run

    fake = baselines.Baseline("sdpa", "always out of memory", lambda q: None, make)
    monkeypatch.setattr(baselines, "BASELINES", (fake,))
    runner = Runner(_config(), progress=False)
    rows = runner.run()
    sdpa = [r for r in rows if r["method"] == "sdpa"][0]
    dense = [r for r in rows if r["method"] == "dense"][0]
    assert sdpa["status"] == "error" and sdpa["error"].startswith("out of memory"), sdpa["error"]
    assert dense["status"] == "ok" and dense["speedup"] is None, "no speedup without a baseline time"


def test_method_without_usable_example_is_an_error_row() -> None:
    runner = Runner(_config(methods=["sliding_window"], overrides={"sliding_window": {"window": 0}}), progress=False)
    row = [r for r in runner.run() if r["method"] == "sliding_window"][0]
    assert row["status"] == "error" and "window" in row["error"], row["error"]


def test_backward_timing_runs_backward_and_drops_old_grads() -> None:
    runner = Runner(_config(backward=True), progress=False)
    (q,) = runner._grad_leaves(torch.randn(4, 3))
    calls = []

    def forward():
        calls.append(1)
        return (q * 2.0,)

    step = runner._timed(forward, (q,))
    with torch.no_grad():  # the runner times under no_grad; backward timing must re-enable it
        step()
        step()
    assert len(calls) == 2 and q.grad is not None
    assert torch.equal(q.grad, torch.full((4, 3), 2.0)), "gradients accumulated across timed runs"
    assert Runner(_config(), progress=False)._timed(forward, (q,)) is forward


def test_dirty_flag_covers_sources_only(tmp_path) -> None:
    import subprocess

    from attnkit.bench import env

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    (tmp_path / "bench.json").write_text("{}\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "init", "--allow-empty")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "files")
    (tmp_path / "bench.json").write_text('{"rows": []}\n')  # what a run writes
    assert env.git_commit(tmp_path)["dirty"] is False
    (tmp_path / "src" / "m.py").write_text("x = 2\n")
    assert env.git_commit(tmp_path)["dirty"] is True


def test_forced_kernel_that_cannot_serve_the_inputs_is_skipped(monkeypatch) -> None:
    def make(q, k, v, causal, scale):
        def run():
            raise RuntimeError("No available kernel. Aborting execution.")
        return run

    fake = baselines.Baseline("sdpa-efficient", "forced kernel", lambda q: None, make)
    monkeypatch.setattr(baselines, "BASELINES", (fake,))
    row = [r for r in Runner(_config(), progress=False).run() if r["method"] == "sdpa-efficient"][0]
    assert row["status"] == "skipped" and "cannot serve these inputs" in row["error"], row
