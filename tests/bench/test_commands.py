"""`attnkit list`, `attnkit explain`, `attnkit --version` and a closed stdout pipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import attnkit
from attnkit.cli import main


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"attnkit {attnkit.__version__}"


def test_list_shows_options_and_kv_policies(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "options: block_size, topk" in out, "moba's options are missing"
    assert "KV-cache policies" in out
    for policy in ("streaming", "h2o", "snapkv", "razor", "quest", "recycled", "santa"):
        assert f"\n  {policy}" in out, f"policy {policy} missing"
    assert main(["list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in doc["methods"]} >= {"dense", "moba"}
    pols = {p["name"]: p for p in doc["kv_policies"]}
    assert pols["snapkv"]["options"][0] == "budget" and pols["snapkv"]["kind"] == "eviction"
    assert pols["quest"]["options"] == ["topk"] and pols["quest"]["kind"] == "reader"


def test_explain_names_the_chosen_backend(capsys: pytest.CaptureFixture) -> None:
    assert main(["explain", "moba", "--seqlen", "256", "--set", "topk=2", "--heads", "2", "--head-dim", "16"]) == 0
    out = capsys.readouterr().out
    assert "topk=2" in out and "-> reference" in out, out
    assert "no triton" in out and "runs on cuda" in out, out


@pytest.mark.parametrize("argv, message", [
    (["explain", "nope"], "method: expected one of"),
    (["explain", "moba", "--set", "topk=0"], "topk"),
    (["explain", "dense", "--seqlen", "0"], "--seqlen: expected an integer >= 1"),
    (["explain", "dense", "--set", "x"], "--set: expected OPTION=VALUE"),
    (["explain", "dense", "--dtype", "int8"], "--dtype"),
])
def test_explain_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_closed_pipe_is_quiet() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "attnkit", "list", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write (the import takes seconds)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
