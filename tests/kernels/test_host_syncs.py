"""Selections on their GPU paths read nothing back to the host (no `.item()`, `nonzero`, ...: each
would be a host sync per call on a GPU, a fixed cost at short T, and would break CUDA-graph
capture at decode). Checked on the CPU with the kernels in Triton's interpreter, by counting the
aten ops that read values back (`helpers.host_reads`); Quest's decode step is checked in
`test_quest_select.py`."""

from __future__ import annotations

import pytest
import torch

import attnkit.methods.moba as moba
from attnkit import config

from .helpers import host_reads


@pytest.mark.parametrize("tq", [1, 40])  # a decode query, and a prefill
def test_moba_selection_through_its_kernel_reads_nothing_back(kernel_device, tq):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, tq, 4, 16, generator=g).to(kernel_device, torch.bfloat16)
    k = torch.randn(1, 64, 2, 16, generator=g).to(kernel_device, torch.bfloat16)
    with config.override(routed_topk_devices=(kernel_device,)):
        assert moba.routed_kernel(q.device, q.dtype, 4) is not None  # the kernel path is the one checked
        assert host_reads(lambda: moba.select(q, k, block_size=8, topk=4)) == {}
    assert host_reads(lambda: int(q.float().abs().max()) + bool(k.isnan().any())) == {
        "aten::_local_scalar_dense": 2}  # the counter sees a read-back
