"""Shared fixtures and the tolerance rule of DESIGN.md section 7.

The rule (flash-attn's): a fast path passes when its error against the float64 oracle is at
most `factor` (2) times the error of a plain PyTorch computation in the same dtype against the
same oracle, plus a floor of a few ulps so exact paths in float64 are not held to zero.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings


def _import_triton_for_the_interpreter() -> None:
    """Without a GPU, the Triton kernels' CPU twins run in Triton's interpreter. Triton decides
    interpreter or compiler when a function is decorated, and its own standard library (`tl.sum`,
    `tl.sort`, `tl.cumsum`, ...) is decorated when `triton` is first imported. Import it here,
    before any test can import it for compiling, with `TRITON_INTERPRET=1` set for the import only,
    so kernels that use the standard library run in the interpreter whatever ran before them."""
    if torch.cuda.is_available() or "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    from attnkit import config

    with config.triton_interpret_set():
        import triton.language  # noqa: F401


_import_triton_for_the_interpreter()

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference over entries; -inf entries must agree exactly (empty rows of the LSE)."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    inf_a, inf_b = torch.isinf(a64), torch.isinf(b64)
    if not torch.equal(inf_a, inf_b) or not torch.equal(a64[inf_a], b64[inf_b]):
        return float("inf")
    if a64.numel() == 0 or (~inf_a).sum() == 0:
        return 0.0
    return (a64[~inf_a] - b64[~inf_b]).abs().max().item()


def assert_close_rule(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    baseline: torch.Tensor,
    name: str = "output",
    factor: float = 2.0,
    floor_ulps: float = 8.0,
) -> None:
    """Assert |actual - oracle| <= factor * |baseline - oracle| + floor (DESIGN.md section 7)."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}"
    err = max_error(actual, oracle)
    base = max_error(baseline, oracle)
    finite = oracle[torch.isfinite(oracle)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    floor = floor_ulps * torch.finfo(actual.dtype).eps * scale
    assert err <= factor * base + floor, (
        f"{name}: max error {err:.3e} vs float64 oracle exceeds {factor} x same-dtype PyTorch error "
        f"{base:.3e} + floor {floor:.1e}"
    )


def assert_close64(actual: torch.Tensor, oracle: torch.Tensor, name: str = "output", rtol: float = 1e-9) -> None:
    """For float64 paths: agreement to `rtol` relative to the oracle's magnitude."""
    err = max_error(actual, oracle)
    finite = oracle[torch.isfinite(oracle)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.0e} x scale {scale:.3g}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def config_override():
    """Change attnkit settings for one test: `config_override(routed_topk_devices=())` (through
    `attnkit.config.override`; each call stacks, all are undone after the test)."""
    import contextlib

    from attnkit import config

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(config.override(**changes))
