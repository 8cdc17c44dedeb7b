"""Tiny-model tests run single-threaded: at these sizes intra-op threads only add overhead (and
contend with other test processes on a shared machine)."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
