"""`attnkit bench --preset decode` on the CPU at tiny shapes: the bench schema, one row per backend
and reader, the fidelity columns against the exact step, and its argument errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnkit.bench.decode import PAGE_SIZE, QUEST_FRACTION
from attnkit.bench.schema import validate
from attnkit.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = ["--preset", "decode", "--device", "cpu", "--seqlens", "64,256", "--batch", "2", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--dtype", "fp32", "--repeats", "2", "--warmup", "1",
        "--budget", "0.5", "--no-progress"]


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, int]:
    out = tmp_path_factory.mktemp("decode")
    rc = main(["bench", *TINY, "--backends", "sdpa,reference", "--out", str(out)])
    return json.loads((out / "bench.json").read_text()), rc


def _row(doc: dict, T: int, method: str, backend: str) -> dict:
    rows = [r for r in doc["rows"] if (r["T"], r["method"], r["backend"]) == (T, method, backend)]
    assert len(rows) == 1, f"{len(rows)} rows for T={T} {method}[{backend}]"
    return rows[0]


def test_decode_preset_writes_the_bench_schema(decode_run: tuple[dict, int]) -> None:
    doc, rc = decode_run
    assert rc == 0
    assert validate(doc) == []
    assert doc["config"]["study"] == "decode" and doc["workloads"][0]["name"] == "decode"
    assert {r["T"] for r in doc["rows"]} == {64, 256}
    assert all(r["workload"] == "decode" and r["batch"] == 2 and r["heads_q"] == 4 for r in doc["rows"])


@pytest.mark.parametrize("T", [64, 256])
def test_dense_rows_are_exact_and_quest_reads_its_pages(decode_run: tuple[dict, int], T: int) -> None:
    doc, _ = decode_run
    base = _row(doc, T, "sdpa", "sdpa")
    assert base["kind"] == "baseline" and base["status"] == "ok" and base["speedup"] == 1.0
    for b in ("sdpa", "reference"):
        dense = _row(doc, T, "dense", b)
        assert dense["status"] == "ok" and dense["time_ms"] > 0 and dense["rel_error"] < 1e-5
        assert math.isclose(dense["speedup"], base["time_ms"] / dense["time_ms"])
    quest = _row(doc, T, "quest", "reference")
    topk = max(1, T // PAGE_SIZE // QUEST_FRACTION)
    assert quest["status"] == "ok" and quest["options"]["topk"] == topk
    assert quest["density"] == topk * PAGE_SIZE / T
    assert quest["select_ms"] is not None and 0 < quest["select_ms"]
    assert quest["rel_error"] > 1e-3  # it reads part of the cache: random inputs are not reproduced exactly
    # SDPA takes no selection: the row says so instead of measuring something else
    assert _row(doc, T, "quest", "sdpa")["status"] == "skipped"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "moba"], "--methods: the decode preset measures a fixed set"),
    (["--backends", "flex"], "--backends: expected 'all', 'auto' or some of triton, sdpa, reference"),
    (["--kv-heads", "3"], "--kv-heads: expected a divisor of --heads"),
])
def test_decode_preset_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture,
                                            tmp_path: Path) -> None:
    rc = main(["bench", *TINY, *argv, "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "warning" not in line]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_decode_preset_triton_rows_under_the_interpreter(tmp_path: Path) -> None:
    """The Triton rows run the decode kernel's CPU twin (a subprocess: TRITON_INTERPRET stays out of
    other tests) and match the exact step."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(SRC))
    argv = [a if a != "64,256" else "64" for a in TINY]
    proc = subprocess.run([sys.executable, "-m", "attnkit.bench", *argv, "--backends", "triton", "--repeats", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    dense, quest = _row(doc, 64, "dense", "triton"), _row(doc, 64, "quest", "triton")
    assert dense["status"] == "ok" and dense["rel_error"] < 1e-5
    assert quest["status"] == "ok" and quest["rel_error"] is not None
