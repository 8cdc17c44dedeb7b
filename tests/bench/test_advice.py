"""The recommendation rules (`attnkit.bench.advice`) on hand-made rows: each rule can flip the answer."""

from __future__ import annotations

from attnkit.bench import advice
from attnkit.bench.runner import new_row


def _row(method: str, family: str, workload: str, ms: float, spread: float = 1.0, **kw) -> dict:
    kind = "baseline" if method == "sdpa" else "method"
    base = dict(method=method, family=family, kind=kind, backend="sdpa" if kind == "baseline" else "triton",
                workload=workload, T=4096, batch=1, heads_q=8, heads_kv=2, head_dim=64, dtype="bf16",
                device="cuda", time_ms=ms, time_min_ms=ms / spread ** 0.5, time_max_ms=ms * spread ** 0.5, repeats=5)
    base.update(kw)
    return new_row(**base)


def _rows(sparse_ms: float, recall: float, err: float, spread: float = 1.0) -> list[dict]:
    rows = []
    for wl in ("random", "structured"):
        rows.append(_row("sdpa", "exact", wl, 10.0, rel_error=1e-3, recall=1.0))
        rows.append(_row("moba", "sparse", wl, sparse_ms, spread, recall=recall if wl == "structured" else 0.5,
                         rel_error=err if wl == "structured" else 0.5))
        rows.append(_row("gla", "linear", wl, 1.0))
    return rows


def test_faster_and_faithful_is_recommended() -> None:
    (d,) = advice.decide(_rows(2.0, 0.95, 0.01))
    assert d.use is not None and d.use.label == "moba[triton]" and abs(d.use.speedup - 5.0) < 1e-9
    assert "use moba[triton], 5.00x faster" in d.sentence()
    assert d.linear is not None and d.linear.label == "gla[triton]", "the linear row is named, never chosen"


def test_low_recall_or_high_error_means_exact() -> None:
    for recall, err, why in ((0.8, 0.01, "recall 0.80 < 0.9"), (0.95, 0.2, "relative error 0.2 > 0.05")):
        (d,) = advice.decide(_rows(2.0, recall, err))
        assert d.use is None and d.choice == "sdpa" and why in d.sentence(), d.sentence()


def test_speedup_within_the_noise_is_not_a_win() -> None:
    (d,) = advice.decide(_rows(8.0, 0.95, 0.01, spread=2.0))  # 8 ms but its slowest run is past SDPA's fastest
    assert d.use is None and "less than the timing spread" in d.sentence(), d.sentence()
    lines = advice.summary({"rows": _rows(8.0, 0.95, 0.01, spread=2.0), "device": {"name": "GPU"}})
    assert any(line.startswith("Warning: noisy timings") for line in lines), lines


def test_fronts_keep_only_undominated_rows() -> None:
    rows = _rows(2.0, 0.95, 0.01)
    for r in rows:
        r["speedup"] = 10.0 / r["time_ms"]
    front = advice.fronts(rows)[("cuda", "bf16", 4096, "structured")]
    assert [advice.label(r) for r in front] == ["moba[triton]", "sdpa"]  # gla has no error: not on a fidelity front
