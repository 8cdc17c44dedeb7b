"""Which (query, key) pairs a method lets each query see, found generically from the method module.

For the attention-mass recall and density of a sparse method the benchmark needs its visibility,
evaluated chunk by chunk (never `T x T`). It is looked up in this order:

1. `family == "exact"` (dense, baselines): every causally visible key.
2. `attnkit.methods.<name>.select(q, k, ...)`: the method's selection policy. Its parameters are
   filled by name from the inputs (`q`, `k`, `v`), the call (`causal`, `scale`) and the method's
   options (the same keyword names as the method); it may return a `KVSelection`, a mask
   predicate (`core.masks.Mask`), or a tuple holding one.
3. `attnkit.methods.<name>.mask(opts)`: a static pattern's predicate, from the parsed options.

Otherwise the method's visibility is unknown and recall, density and mask-aware FLOPs are reported
as not available, with the reason. The causal rule always applies on top, as the executors do.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..core.contract import AttentionCall
from ..core.masks import Mask
from ..core.selection import KVSelection, cdiv
from ..registry import MethodSpec, parse_options


@dataclass
class Visibility:
    """A method's visible pairs for one call, evaluated a query chunk at a time."""

    source: str  # "exact", "select" or "mask"
    batch: int
    hq: int
    hkv: int
    tq: int
    tk: int
    causal: bool
    selection: Optional[KVSelection] = None
    mask: Optional[Mask] = None

    def chunk(self, qs: slice, device: torch.device) -> torch.Tensor:
        """Visible pairs for queries `qs`: bool `[B | 1, Hq | 1, Cq, Tk]` (broadcastable to `[B, Hq, Cq, Tk]`)."""
        rows = torch.arange(qs.start, qs.stop, device=device)
        q_pos = (rows + (self.tk - self.tq)).view(1, 1, -1, 1)
        k_pos = torch.arange(self.tk, device=device).view(1, 1, 1, -1)
        vis = (k_pos <= q_pos) if self.causal else torch.ones(1, 1, 1, self.tk, dtype=torch.bool, device=device)
        if self.mask is not None:
            b = torch.arange(self.batch, device=device).view(-1, 1, 1, 1)
            h = torch.arange(self.hq, device=device).view(1, -1, 1, 1)
            vis = vis & self.mask(b, h, q_pos, k_pos)
        if self.selection is not None:
            vis = vis & self._selected(rows, device)
        return vis

    def _selected(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        sel = self.selection
        nk = cdiv(self.tk, sel.k_block)
        idx = sel.indices.to(device=device, dtype=torch.int64)[:, :, rows // sel.q_block, :]  # [B, Hsel, Cq, S]
        idx = torch.where(idx < 0, nk, idx)
        blocks = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool, device=device)
        blocks.scatter_(-1, idx, True)
        keys = blocks[..., torch.arange(self.tk, device=device) // sel.k_block]  # [B, Hsel, Cq, Tk]
        if keys.shape[1] == 1:
            return keys
        return keys[:, sel.head_map(self.hq, self.hkv).to(device)]

    def pairs(self, pairs: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Visibility of given (query, key) pairs `[P, 2]`: bool `[B, Hq, P]`."""
        out = torch.zeros(self.batch, self.hq, pairs.shape[0], dtype=torch.bool, device=device)
        for n, (i, j) in enumerate(pairs.tolist()):
            out[:, :, n] = self.chunk(slice(i, i + 1), device)[..., 0, j].expand(self.batch, self.hq)
        return out


def method_module(name: str) -> Optional[Any]:
    """`attnkit.methods.<name>` if it exists."""
    try:
        return importlib.import_module(f"attnkit.methods.{name}")
    except ModuleNotFoundError:
        return None


def _call_select(select: Any, call: AttentionCall, options: dict[str, Any]) -> Any:
    """Call `select` with the arguments its signature names (inputs, call settings, options)."""
    params = inspect.signature(select).parameters
    given = {"q": call.q, "k": call.k, "v": call.v, "causal": call.causal, "scale": call.scale}
    args, kwargs = [], {}
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in given:
            value = given[name]
        elif name in options:
            value = options[name]
        elif p.default is p.empty:
            raise TypeError(f"select() needs {name!r}, which is neither an input nor an option")
        else:
            continue
        if p.kind is p.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[name] = value
    if takes_var_kw:
        kwargs.update({k: v for k, v in options.items() if k not in kwargs})
    return select(*args, **kwargs)


def _as_visibility(result: Any) -> Union[KVSelection, Mask, None]:
    if isinstance(result, (KVSelection, Mask)):
        return result
    if isinstance(result, (tuple, list)):
        for item in result:
            if isinstance(item, (KVSelection, Mask)):
                return item
    return None


def resolve(spec: MethodSpec, call: AttentionCall, options: dict[str, Any]) -> tuple[Optional[Visibility], str]:
    """The method's visibility for this call, or None and why it is not available."""
    base = dict(batch=call.batch, hq=call.hq, hkv=call.hkv, tq=call.tq, tk=call.tk, causal=call.causal)
    if spec.family == "exact":
        return Visibility("exact", **base), "exact: every causally visible key"
    if spec.family == "linear":
        return None, "linear family: a different model, not an approximation of softmax attention"
    module = method_module(spec.name)
    if module is not None and callable(getattr(module, "select", None)):
        with torch.no_grad():
            found = _as_visibility(_call_select(module.select, call, options))
        if isinstance(found, KVSelection):
            found.validate(call.batch, call.hq, call.hkv, call.tq, call.tk, check_rows=False)
            return Visibility("select", selection=found, **base), f"attnkit.methods.{spec.name}.select"
        if isinstance(found, Mask):
            return Visibility("select", mask=found, **base), f"attnkit.methods.{spec.name}.select"
        return None, f"attnkit.methods.{spec.name}.select returned neither a KVSelection nor a Mask"
    if module is not None and callable(getattr(module, "mask", None)):
        found = module.mask(parse_options(spec, call, options))
        if isinstance(found, Mask):
            return Visibility("mask", mask=found, **base), f"attnkit.methods.{spec.name}.mask"
    return None, f"attnkit.methods.{spec.name} exposes neither select(q, k, ...) nor mask(opts)"
