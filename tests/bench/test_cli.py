"""The tiny benchmark run of the CI (CPU, two methods, two lengths) and the argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.bench.schema import validate
from attnkit.cli import main

TINY = ["--methods", "dense,sliding_window", "--seqlens", "64,128", "--workloads", "random,structured",
        "--set", "sliding_window.window=4096", "--repeats", "2", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, int]:
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", *TINY, "--out", str(out)])
    return out, json.loads((out / "bench.json").read_text()), rc


def _rows(doc: dict, method: str) -> list[dict]:
    rows = [r for r in doc["rows"] if r["method"] == method]
    assert rows, f"no rows for {method!r}; methods present: {sorted({r['method'] for r in doc['rows']})}"
    return rows


def test_tiny_run_json_matches_schema(tiny_run: tuple[Path, dict, int]) -> None:
    _, doc, rc = tiny_run
    assert rc == 0, f"bench exited {rc}"
    problems = validate(doc)
    assert not problems, "schema problems: " + "; ".join(problems[:5])
    assert doc["device"]["type"] == "cpu" and doc["versions"]["torch"] == torch.__version__
    assert doc["command"].startswith("attnkit bench --methods dense,sliding_window")
    # 2 workloads x 2 lengths x (sdpa baseline + 2 methods)
    got = sorted((r["workload"], r["T"], r["method"]) for r in doc["rows"])
    want = sorted((w, t, m) for w in ("random", "structured") for t in (64, 128) for m in ("sdpa", "dense", "sliding_window"))
    assert got == want, f"rows {got} != expected {want}"
    bad = [(r["method"], r["workload"], r["T"], r["error"]) for r in doc["rows"] if r["status"] != "ok"]
    assert not bad, f"rows not ok: {bad}"


def test_dense_fidelity_is_exact(tiny_run: tuple[Path, dict, int]) -> None:
    _, doc, _ = tiny_run
    for r in _rows(doc, "dense"):
        assert r["rel_error"] is not None and r["rel_error"] < 1e-5, (
            f"dense {r['workload']} T={r['T']}: rel error {r['rel_error']} >= 1e-5 in fp32")
        assert r["cosine"] > 1 - 1e-6, f"dense {r['workload']} T={r['T']}: cosine {r['cosine']}"
        assert r["recall"] == 1.0 and r["density"] == 1.0
        assert r["time_ms"] > 0 and r["speedup"] > 0 and r["tflops"] > 0
        assert r["peak_memory_bytes"] > 0 and r["memory_measure"] == "cpu_live_tensors"


def test_full_selection_has_recall_one(tiny_run: tuple[Path, dict, int]) -> None:
    _, doc, _ = tiny_run
    for r in _rows(doc, "sliding_window"):
        assert r["options"]["window"] == 4096, f"override not applied: {r['options']}"
        assert r["recall_source"].startswith("attnkit.methods.sliding_window.mask"), r["recall_source"]
        assert r["recall"] == 1.0 and r["recall_min"] == 1.0, (
            f"sliding_window window >= T, {r['workload']} T={r['T']}: recall {r['recall']}, min {r['recall_min']}")
        assert r["density"] == 1.0, f"density {r['density']} != 1 for a full selection"
        assert r["rel_error"] < 1e-5 and r["lse_error"] < 1e-5, (
            f"full window should equal exact attention: rel {r['rel_error']}, lse {r['lse_error']}")
        if r["workload"] == "structured":
            assert r["needle_hits"] == 1.0, f"needle hits {r['needle_hits']}"


def test_summary_names_what_to_use(tiny_run: tuple[Path, dict, int]) -> None:
    out, doc, _ = tiny_run
    page = (out / "report.html").read_text()
    start = page.index('<section id="summary">')
    summary = page[start:page.index("</section>", start)]
    # on this CPU at T <= 128 nothing approximate beats SDPA at recall >= 0.9: the answer is exact attention
    assert "use exact attention, method=&#x27;dense&#x27;" in summary, summary
    assert "T=128 fp32 on cpu" in summary and "T=64 fp32 on cpu" in summary, summary
    assert page.index('id="summary"') < page.index("<h2>Results</h2>"), "the summary must come before the table"
    md = (out / "bench.md").read_text()
    assert "## Summary: what to use here" in md and "## How to read the columns" in md and "Pareto front" in md
    for r in doc["rows"]:
        assert r["time_min_ms"] <= r["time_ms"] <= r["time_max_ms"], (r["method"], r["time_min_ms"], r["time_ms"])


def test_reports_and_plots_written(tiny_run: tuple[Path, dict, int]) -> None:
    out, doc, _ = tiny_run
    for name in ("bench.json", "bench.md", "report.html", "time_vs_T.png", "fidelity_vs_speedup.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, f"{name} missing or empty in {sorted(p.name for p in out.iterdir())}"
    html = (out / "report.html").read_text()
    assert 'src="time_vs_T.png"' in html and 'src="fidelity_vs_speedup.png"' in html
    assert (out / "time_vs_T.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "bench.md").read_text()
    assert md.count("| sliding_window |") == 4, "markdown table should hold one line per sliding_window row"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "no_such_method"], "--methods: unknown method 'no_such_method'"),
    (["--seqlens", "0"], "--seqlens: expected an integer >= 1"),
    (["--seqlens", "-64"], "--seqlens: expected an integer >= 1"),
    (["--seqlens", "abc"], "--seqlens: expected an integer"),
    (["--dtype", "fp8"], "--dtype: expected fp16, bf16, fp32 or fp64"),
    (["--workloads", "images"], "--workloads: expected some of random, structured, real"),
    (["--set", "dense"], "--set: expected METHOD.OPTION=VALUE"),
    (["--set", "sliding_window.nope=3"], "--set: 'nope' is not an option of 'sliding_window'"),
    (["--quick", "--gpu"], "are exclusive presets"),
    (["--preset", "nope"], "--preset: expected one of quick, gpu"),
    (["--set", "moba.topk=0"], "--set moba.topk=0: topk"),
    (["--set", "sliding_window.window=-3"], "--set sliding_window.window=-3: window"),
    (["--methods", "dense", "--set", "moba.topk=2"], "--set: method 'moba' is not in this run"),
    (["--workloads", "real", "--seqlens", "256"], "--seqlens: the real workload has a fixed shape"),
    (["--workloads", "real", "--heads", "4"], "--heads: the real workload has a fixed shape"),
    (["--backends", "nope"], "--backends: no selected method has a backend 'nope'"),
    (["--backends", "all,flex"], "--backends: 'all' cannot be combined"),
    (["--backends", "triton", "--device", "cpu"], "--backends: 'triton' runs on cuda"),
    (["--budget", "-1"], "--budget: expected a positive number"),
    (["--kv-heads", "3"], "--kv-heads: expected a divisor of --heads"),
])
def test_bad_arguments_exit_nonzero_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture,
                                                  tmp_path: Path) -> None:
    rc = main(["bench", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "warning" not in line]
    assert rc == 2, f"{argv}: exit status {rc}, expected 2"
    assert len(err) == 1 and message in err[0], f"{argv}: stderr {err!r} lacks {message!r}"
    assert not (tmp_path / "o").exists(), f"{argv}: the output directory was created before the argument check"


def test_stdout_ends_with_summary_and_failed_rows_exit_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from attnkit.bench import baselines

    def make(q, k, v, causal, scale):
        def run():
            raise RuntimeError("kernel exploded")
        return run

    monkeypatch.setattr(baselines, "BASELINES", (baselines.Baseline("sdpa", "always fails", lambda q: None, make),))
    argv = ["bench", "--methods", "dense", "--seqlens", "32", "--workloads", "random", "--repeats", "1",
            "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--no-progress"]
    rc = main([*argv, "--out", str(tmp_path / "a")])
    out, err = capsys.readouterr()
    assert rc == 1, f"a failed row must give exit status 1, got {rc}"
    assert "1 rows failed at run time" in err and "--keep-going" in err, err
    tail = out.strip().splitlines()
    assert "Summary: what to use here" in out and tail[-1].startswith("Fidelity is judged"), tail[-3:]
    assert "use exact attention" in out, out[-800:]
    assert main([*argv, "--keep-going", "--out", str(tmp_path / "b")]) == 0


def test_named_backends_give_one_row_per_named_backend(tmp_path: Path) -> None:
    rc = main(["bench", "--methods", "dense,sliding_window", "--backends", "reference", "--seqlens", "32",
               "--workloads", "random", "--repeats", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
               "--no-baselines", "--no-progress", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 0 and doc["config"]["backends"] == "reference"
    got = sorted((r["method"], r["backend"], r["status"]) for r in doc["rows"])
    assert got == [("dense", "reference", "ok"), ("sliding_window", "reference", "ok")], got


def test_presets_are_complete_runs() -> None:
    from attnkit.bench.cli import PRESETS, register_all
    from attnkit.registry import get_method

    register_all()
    for name, p in PRESETS.items():
        assert p.about, f"preset {name} has no description"
        if p.study == "decode":  # dense decode and the Quest reader (a KV policy), measured by bench.decode
            from attnkit.kv import Quest

            assert p.methods == "dense,quest" and Quest.name == "quest"
            get_method("dense")
        elif p.methods != "all":
            for m in p.methods.split(","):
                get_method(m)  # raises for a method the preset names but the registry lacks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU; this machine has one")
def test_gpu_preset_without_gpu_fails(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    rc = main(["bench", "--gpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "--gpu: no CUDA GPU" in err, f"rc {rc}, stderr {err!r}"


def test_module_entry_point_reports_bad_method() -> None:
    proc = subprocess.run([sys.executable, "-m", "attnkit.bench", "--methods", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr {proc.stderr!r}"
    assert "unknown method 'nope'" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_preset_small(tmp_path: Path) -> None:
    rc = main(["bench", "--gpu", "--methods", "dense", "--seqlens", "1K", "--workloads", "random",
               "--out", str(tmp_path), "--no-progress"])
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 0 and not validate(doc)
    dense = _rows(doc, "dense")[0]
    assert dense["memory_measure"] == "cuda_max_allocated" and dense["time_ms"] > 0, dense


def test_backward_rows_time_forward_and_backward(tmp_path: Path) -> None:
    common = ["bench", "--methods", "dense,moba", "--seqlens", "64", "--workloads", "random", "--repeats", "2",
              "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "f")]) == 0
    assert main([*common, "--backward", "--out", str(tmp_path / "b")]) == 0
    fwd = {r["method"]: r for r in json.loads((tmp_path / "f" / "bench.json").read_text())["rows"]}
    doc = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert not validate(doc) and doc["config"]["grad"] is True
    for name, r in ((r["method"], r) for r in doc["rows"]):
        assert r["status"] == "ok" and r["pass"] == "forward+backward", (name, r["status"], r["error"])
        assert fwd[name]["pass"] == "forward"
        # fidelity is the forward output's, whatever is timed
        assert r["rel_error"] == pytest.approx(fwd[name]["rel_error"], rel=1e-6, abs=1e-12), name


def test_default_output_is_an_ignored_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bench` (no --out) must not rewrite committed files: it writes under bench_out/, which git ignores."""
    import argparse

    from attnkit.bench.cli import _out_dir, add_arguments, build_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--quick", "--methods", "dense"])
    out = _out_dir(args, build_config(args))
    assert out.parts[0] == "bench_out" and out.name == "quick-cpu", out
    root = Path(__file__).resolve().parents[2]
    assert "bench_out/" in (root / ".gitignore").read_text().splitlines()
