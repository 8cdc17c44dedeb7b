"""The one dispatcher: backends declared as data, every reason a backend cannot serve a call, and the
measured order that `backend="auto"` follows.

A `Backend` declares what it supports as data (devices, dtypes, largest head dim, LSE, varlen,
backward, the kinds of package it requires, checked in `core.availability`, the setting of
`attnkit.config` that turns it off, and a `supports` check for what the data cannot say), in the
spirit of xformers' operators. `choose` asks every backend why it cannot serve a call and picks the
first of the others, in the measured order where the table has one; the `Explanation` it returns is
what `attnkit.explain` prints.

Dispatch by measurement: the registry lists each method's backends in a default preference order; where several of them can
run a call on a GPU, the order that was fastest *in a benchmark run on that GPU* wins. The table
(`measured_dispatch.TABLE`) is generated from a committed results file by
`scripts/make_dispatch_table.py` and records its source, device and versions, so `explain()` can say
where the choice came from. A call on a device the table does not name, or outside its measured
lengths' buckets, keeps the registry's order. A call that will be differentiated (grad mode on and
q, k or v requiring grad) follows the forward+backward ranking where the table has one, because the
fastest forward and the fastest forward+backward can be different backends (see the table itself).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .. import config
from ..core import availability
from ..core.contract import SUPPORTED_DTYPES, AttentionCall, AttnkitError, BackendError

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


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


Runner = Callable[[AttentionCall, Any], Any]
Check = Callable[[AttentionCall, Any], Optional[str]]
Blocks = Callable[[Any], Optional[tuple[int, ...]]]


@dataclass(frozen=True)
class Backend:
    """One way to run a method or an op, its support declared as data.

    `requires`: the kinds of package it needs (keys of `core.availability.CHECKS`: "triton", "flex",
    "fla", "cudnn"); `available()` a further check of its own (None, or why not); `disabled_by`: a
    boolean setting of `attnkit.config` that turns it off when false; `max_head_dim`: the largest
    head dim (of q/k and of v) it takes; `block_multiple`: the block sizes it takes are multiples of
    this, `blocks(opts)` giving a call's block sizes (None: not block-level, which it cannot serve).
    `supports(call, opts)` adds what the data cannot say.
    `auto_devices`: device types where `backend="auto"` may pick it (None: all of `devices`);
    elsewhere it runs only when requested by name (the Triton kernels' CPU interpreter twins)."""

    name: str
    run: Runner
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES
    lse: bool = True
    varlen: bool = True
    backward: bool = True
    available: Optional[Callable[[], Optional[str]]] = None
    supports: Optional[Check] = None
    auto_devices: Optional[tuple[str, ...]] = None
    requires: tuple[str, ...] = ()
    disabled_by: Optional[str] = None
    max_head_dim: Optional[int] = None
    block_multiple: Optional[int] = None
    blocks: Optional[Blocks] = None

    def unavailable(self) -> Optional[str]:
        """Why this backend cannot run in this environment at all (packages, settings), or None."""
        for kind in self.requires:
            reason = availability.missing(kind)
            if reason:
                return reason
        if self.available is not None:
            reason = self.available()
            if reason:
                return reason
        if self.disabled_by is not None and not getattr(config.get(), self.disabled_by):
            return f"turned off by the setting {self.disabled_by}=False (attnkit.config; docs/flags.md)"
        return None

    def reasons(self, call: AttentionCall, opts: Any, requested: bool = True) -> list[str]:
        """Every reason this backend cannot serve the call (empty: it can)."""
        reason = self.unavailable()
        if reason:
            return [reason]  # nothing else can be asked of a backend that cannot load
        out = []
        if call.device.type not in self.devices:
            out.append(f"runs on {'/'.join(self.devices)}, inputs are on {call.device.type}")
        elif not requested and self.auto_devices is not None and call.device.type not in self.auto_devices:
            out.append(f"chosen automatically on {'/'.join(self.auto_devices)} only (inputs are on "
                       f"{call.device.type}; request backend={self.name!r} to run it there)")
        if call.dtype not in self.dtypes:
            have = ", ".join(DTYPE_NAMES[d] for d in self.dtypes)
            out.append(f"dtype {DTYPE_NAMES.get(call.dtype, call.dtype)} not supported (supports {have})")
        if self.max_head_dim is not None and max(call.head_dim, call.head_dim_v) > self.max_head_dim:
            out.append(f"head dim {call.head_dim}/{call.head_dim_v} > {self.max_head_dim}")
        if self.block_multiple is not None and self.blocks is not None:
            sizes = self.blocks(opts)
            if sizes is None:
                out.append(f"block-level selections only, with blocks a multiple of {self.block_multiple}")
            elif any(size % self.block_multiple for size in sizes):
                out.append(f"blocks {'/'.join(map(str, sizes))} are not multiples of {self.block_multiple}")
        if call.return_lse and not self.lse:
            out.append("cannot return the LSE (return_lse=True)")
        if call.varlen and not self.varlen:
            out.append("no varlen (cu_seqlens) support")
        if call.requires_grad and torch.is_grad_enabled() and not self.backward:
            out.append("forward only, and inputs require grad")
        if self.supports is not None:
            reason = self.supports(call, opts)
            if reason and reason not in out:
                out.append(reason)
        return out

    def why_not(self, call: AttentionCall, opts: Any, requested: bool = True) -> Optional[str]:
        """None when the backend can serve the call, else every reason, joined."""
        return "; ".join(self.reasons(call, opts, requested)) or None




@dataclass
class Explanation:
    """Why each backend was or was not chosen for one call."""

    method: str
    requested: str
    chosen: Optional[str]
    rows: list[tuple[str, bool, str]] = field(default_factory=list)
    # named variants of the method's paths (experimental or device-dependent kernels): (name, on, why)
    variants: list[tuple[str, bool, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"method {self.method!r}, backend={self.requested!r}: chosen {self.chosen!r}"]
        for name, ok, reason in self.rows:
            mark = "->" if name == self.chosen else ("ok" if ok else "no")
            lines.append(f"  {mark} {name:<10} {reason}")
        for name, on, reason in self.variants:
            lines.append(f"  variant {name}: {'on' if on else 'off'} ({reason})")
        return "\n".join(lines)

    __repr__ = __str__


def choose(name: str, backends: Sequence[Backend], call: AttentionCall, opts: Any,
           requested: str = "auto") -> Explanation:
    """Pick the backend of `name` (a method or an op) for a call; the Explanation lists every
    candidate's verdict. `requested` must be "auto" or one of the backends' names (callers check)."""
    exp = Explanation(name, requested, None)
    backends, measured_why = list(backends), None
    if requested == "auto" and len(backends) > 2:  # several executors: the GPU measurement may reorder them
        measured = measured_order(name, call)
        if measured is not None:
            rank = {name: i for i, name in enumerate(measured[0])}
            backends.sort(key=lambda b: rank.get(b.name, len(rank)))  # stable: unmeasured ones keep their order
            measured_why = measured[1]
    for b in backends:
        reason = b.why_not(call, opts, requested=requested == b.name)
        ok = reason is None
        if ok and exp.chosen is None and requested in ("auto", b.name):
            exp.chosen = b.name
            if requested != "auto":
                text = "chosen: requested"
            elif measured_why is not None and b.name in measured[0]:
                text = "chosen: " + measured_why
            else:
                text = "chosen: first supported backend in preference order"
        elif ok:
            text = "supported, not chosen" + (" (another backend was requested)" if requested != "auto" else " (lower preference)")
        else:
            text = reason
        exp.rows.append((b.name, ok, text))
    return exp


def pick(name: str, backends: Sequence[Backend], call: AttentionCall, opts: Any,
         requested: str = "auto") -> tuple[Backend, Explanation]:
    """The backend that runs a call of op `name` and the Explanation; errors name `backend`."""
    names = [b.name for b in backends]
    if requested != "auto" and requested not in names:
        raise AttnkitError(f"backend: expected one of {['auto'] + names} for {name}, got {requested!r}")
    exp = choose(name, backends, call, opts, requested)
    if exp.chosen is None:
        if requested != "auto":
            reason = next(text for n, _, text in exp.rows if n == requested)
            raise AttnkitError(f"backend: {requested!r} cannot serve this call: {reason}")
        raise BackendError(f"no backend can run this call.\n{exp}")
    return next(b for b in backends if b.name == exp.chosen), exp
