"""Kernel tests run on CUDA when there is a GPU, else in Triton's CPU interpreter.

`TRITON_INTERPRET=1` is set only while `attnkit.kernels.load()` imports the kernels (Triton
decides interpreter-or-compiler when a kernel is decorated), then restored, so no other test
folder sees it.
"""

from __future__ import annotations


import pytest
import torch

from attnkit import config, kernels
from attnkit.core import availability


def _load_kernels() -> str:
    if torch.cuda.is_available():
        kernels.load()
        return "cuda"
    with config.triton_interpret_set():
        kernels.load()
    return "cpu"


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Device the Triton kernels run on in this session: 'cuda', or 'cpu' (interpreter)."""
    reason = availability.triton()
    if reason:
        pytest.skip(f"Triton kernels not testable: {reason}")
    dev = _load_kernels()
    if dev == "cpu" and not kernels.interpreted():
        pytest.skip("kernels were loaded for a GPU in this process; the interpreter twin cannot run")
    return dev


@pytest.fixture
def gpu() -> str:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (its CPU twin runs under TRITON_INTERPRET=1 at tiny shapes)")
    kernels.load()
    return "cuda"
