"""Dispatch by measurement: which GPU backend `backend="auto"` prefers, per method, device and length.

The registry lists each method's backends in a default preference order; where several of them can
run a call on a GPU, the order that was fastest *in a benchmark run on that GPU* wins. The table
(`measured_dispatch.TABLE`) is generated from a committed results file by
`scripts/make_dispatch_table.py` and records its source, device and versions, so `explain()` can say
where the choice came from. A call on a device the table does not name, or outside its measured
lengths' buckets, keeps the registry's order. A call that will be differentiated (grad mode on and
q, k or v requiring grad) follows the forward+backward ranking where the table has one: on the H100
the fastest forward and the fastest forward+backward are different backends for `block_topk`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..core.contract import AttentionCall


@functools.lru_cache(maxsize=8)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _training(call: AttentionCall) -> bool:
    """Whether autograd will record this call (then the backward's speed counts too)."""
    return torch.is_grad_enabled() and any(
        getattr(getattr(call, name, None), "requires_grad", False) for name in ("q", "k", "v"))


def measured_order(method: str, call: AttentionCall) -> Optional[tuple[list[str], str]]:
    """`(backend names fastest first, reason)` for this call from the measured table, or None."""
    if call.device.type != "cuda":
        return None
    from .measured_dispatch import TABLE

    name = _device_name(call.device.index if call.device.index is not None else torch.cuda.current_device())
    if TABLE.get("device_match", "\0") not in name:
        return None
    for entry in TABLE.get("entries", []):
        if entry["method"] == method and entry["min_t"] <= call.tk <= entry["max_t"]:
            train = _training(call) and "order_train" in entry
            what, order, evidence = (("forward+backward", entry["order_train"], entry["evidence_train"]) if train
                                     else ("forward", entry["order"], entry["evidence"]))
            why = (f"fastest {what} in the measured table for Tk in [{entry['min_t']}, {entry['max_t']}] "
                   f"({TABLE['source']}, {TABLE['device']}; {evidence})")
            return list(order), why
    return None
