"""Dispatch by measurement: which GPU backend `backend="auto"` prefers, per method, device and length.

The registry lists each method's backends in a default preference order; where several of them can
run a call on a GPU, the order that was fastest *in a benchmark run on that GPU* wins. The table
(`measured_dispatch.TABLE`) is generated from a committed results file by
`scripts/make_dispatch_table.py` and records its source, device and versions, so `explain()` can say
where the choice came from. A call on a device the table does not name, or outside its measured
lengths' buckets, keeps the registry's order.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..core.contract import AttentionCall


@functools.lru_cache(maxsize=8)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


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
            why = (f"fastest forward in the measured table for Tk in [{entry['min_t']}, {entry['max_t']}] "
                   f"({TABLE['source']}, {TABLE['device']}; {entry['evidence']})")
            return list(entry["order"]), why
    return None
