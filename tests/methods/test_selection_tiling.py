"""The accelerator tile policy of the selection methods, run on the CPU (`core.topk.on_accelerator`
patched): the same selections as the CPU policy, from far fewer top-k tiles and with no host sync
(`aten::_local_scalar_dense`, what `int(t)`, `.item()` and `bool(t)` dispatch to)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit as ak
from attnkit.core import topk as topk_mod
from attnkit.core.contract import validate_attention

from ._cases import indexer_inputs, qkv

M = ak.methods
T, HQ, HKV = 1024, 4, 2


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = self.tiles = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        self.syncs += name == "_local_scalar_dense"
        self.tiles += name == "topk"
        return func(*args, **(kwargs or {}))


def _policies() -> dict[str, Callable[[], ak.KVSelection]]:
    q, k, _ = qkv(1, T, T, HQ, HKV, D=16, dtype=torch.float64, seed=7)
    call = validate_attention(q, k, k, causal=True)
    ind = indexer_inputs(1, T, T, hi=4, di=8, dtype=torch.float64, seed=8)
    ind["w"] = ind["w"].abs()
    return {
        "moba": lambda: M.moba.policy(call, M.moba.MobaOptions(16, 4)),
        "nsa": lambda: M.nsa.policy(call, M.nsa.NsaOptions(16, 4)),
        "block_topk": lambda: M.block_topk.policy(call, M.block_topk.BlockTopkOptions(32, 4)),
        "dsa": lambda: M.dsa.policy(call, M.dsa.DsaOptions(64, **ind)),
    }


def _run(fn: Callable[[], ak.KVSelection]) -> tuple[torch.Tensor, _Count]:
    count = _Count()
    with torch.no_grad(), count:
        sel = fn()
    return sel.indices, count


@pytest.mark.parametrize("name", ["moba", "nsa", "block_topk", "dsa"])
def test_accelerator_policy_same_selection_fewer_tiles_no_sync(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fn = _policies()[name]
    cpu_idx, cpu = _run(fn)
    monkeypatch.setattr(topk_mod, "on_accelerator", lambda device: True)
    acc_idx, acc = _run(fn)
    assert acc.syncs == 0, f"{name}: {acc.syncs} host syncs on the accelerator path"
    assert acc.tiles <= cpu.tiles, f"{name}: {acc.tiles} top-k calls on the accelerator path vs {cpu.tiles} on the CPU"
    if name != "dsa":
        assert torch.equal(acc_idx, cpu_idx), f"{name}: the accelerator tiling changed the selection"
    else:  # relu scores tie at 0: compare the indexer scores of the selected keys, not which tied key won
        ind = indexer_inputs(1, T, T, hi=4, di=8, dtype=torch.float64, seed=8)
        full = (ind["w"].abs()[0].unsqueeze(-1) * torch.relu(torch.einsum("thd,sd->ths", ind["q_idx"][0], ind["k_idx"][0]))).sum(1)
        def picked(idx: torch.Tensor) -> torch.Tensor:
            i = idx[0, 0].long()
            return torch.where(i >= 0, full.gather(-1, i.clamp_min(0)), torch.full_like(full[:, :1], float("-inf")).expand_as(i)).sort(-1).values
        assert torch.equal(acc_idx >= 0, cpu_idx >= 0) and torch.allclose(picked(acc_idx), picked(cpu_idx)), (
            "dsa: the accelerator tiling changed the selected scores")


def test_accelerator_policy_makes_fewer_tiles_at_long_t(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, _ = qkv(1, 8192, 8192, 16, 4, D=16, seed=1)
    call = validate_attention(q, k, k, causal=True)
    fn = lambda: M.moba.policy(call, M.moba.MobaOptions(64, 8))  # noqa: E731
    cpu_idx, cpu = _run(fn)
    monkeypatch.setattr(topk_mod, "on_accelerator", lambda device: True)
    acc_idx, acc = _run(fn)
    assert torch.equal(acc_idx, cpu_idx)
    print(f"moba T=8192 Hq=16: {cpu.tiles} top-k calls, {cpu.syncs} host syncs on the CPU policy; "
          f"{acc.tiles} and {acc.syncs} on the accelerator policy")
    assert acc.syncs == 0 and acc.tiles * 4 <= cpu.tiles, (acc.tiles, cpu.tiles)
