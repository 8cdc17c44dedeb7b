"""Per-token tensor inputs that some softmax-family methods need, made by learned projections.

Most methods take fixed options (`topk`, `block_size`, ...). Two take tensors computed from the
model's activations, which a layer must produce itself:

- `nsa` (Native Sparse Attention): gates `g_cmp, g_slc, g_swa: [B, T, Hq]` weighting its
  compressed, selected and sliding branches; the paper computes them from the input with an MLP
  and a sigmoid (`NSAGates`).
- `dsa` (DeepSeek Sparse Attention): the lightning indexer's queries `q_idx: [B, T, Hi, Di]`,
  keys `k_idx: [B, T, Di]` and head weights `w: [B, T, Hi]`, from their own projections of the
  input (`DSAIndexer`). `k_idx` is key-side: it is cached with the keys for decoding.

A maker sees query-side features `xq: [B, Tq, Fq]` and key-side features `xk: [B, Tk, Fk]`. In
`attnkit.layers.Attention` both are the layer input; in the Hugging Face integration they are
the flattened query and key states (the hidden states are not passed to attention functions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn

from ..core.contract import AttnkitError, OptionError
from ..registry import MethodSpec, get_method


class NSAGates(nn.Module):
    detach_input = False

    """NSA's branch gates: `sigmoid(x W + b)` per query head and branch. The sliding branch
    (`g_swa`) exists when the method has a `window`."""

    query_names = ("g_cmp", "g_slc", "g_swa")
    key_names: tuple[str, ...] = ()

    def __init__(self, q_features: int, k_features: int, num_heads: int, options: dict[str, Any]) -> None:
        super().__init__()
        self.q_features, self.k_features, self.num_heads = q_features, k_features, num_heads
        self.branches = self.query_names if options.get("window") is not None else self.query_names[:2]
        self.proj = nn.Linear(q_features, len(self.branches) * num_heads)

    def query_inputs(self, xq: torch.Tensor) -> dict[str, torch.Tensor]:
        B, T, _ = xq.shape
        g = torch.sigmoid(self.proj(xq)).view(B, T, len(self.branches), self.num_heads)  # [B, T, n, Hq]
        return {name: g[:, :, i] for i, name in enumerate(self.branches)}

    def key_inputs(self, xk: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def aux_loss(self, q: torch.Tensor, k: torch.Tensor, made: dict[str, torch.Tensor], options: dict[str, Any],
                 cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None  # the gates train through the attention output


class DSAIndexer(nn.Module):
    """DSA's lightning indexer inputs: `q_idx = x Wq`, `w = x Ww * Hi^-1/2`, `k_idx = x Wk`.

    `heads` (Hi) and `dim` (Di) size the indexer (DeepSeek-V3.2 uses 64 x 128; tiny defaults
    here). Keys go through a LayerNorm as in the paper. As in the paper the indexer reads a
    detached input (`detach_input`): it trains only through `aux_loss`."""

    detach_input = True

    query_names = ("q_idx", "w")
    key_names = ("k_idx",)

    def __init__(self, q_features: int, k_features: int, num_heads: int, options: dict[str, Any],
                 heads: int = 4, dim: int = 32) -> None:
        super().__init__()
        for name, val in (("heads", heads), ("dim", dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise OptionError(f"inputs.{name}: expected an int >= 1, got {val!r}")
        self.q_features, self.k_features = q_features, k_features
        self.heads, self.dim = heads, dim
        self.wq = nn.Linear(q_features, heads * dim, bias=False)
        self.ww = nn.Linear(q_features, heads, bias=False)
        self.wk = nn.Linear(k_features, dim, bias=False)
        self.k_norm = nn.LayerNorm(dim)

    def query_inputs(self, xq: torch.Tensor) -> dict[str, torch.Tensor]:
        B, T, _ = xq.shape
        return {"q_idx": self.wq(xq).view(B, T, self.heads, self.dim), "w": self.ww(xq) * self.heads ** -0.5}

    def key_inputs(self, xk: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"k_idx": self.k_norm(self.wk(xk))}

    def aux_loss(self, q: torch.Tensor, k: torch.Tensor, made: dict[str, torch.Tensor], options: dict[str, Any],
                 cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """DeepSeek's indexer loss (KL from the main attention over the selected keys to the
        indexer's distribution), mean over queries. Top-k selection passes no gradient, so this
        is what trains the indexer; `q`, `k` are only the (detached) target."""
        from ..methods.dsa import indexer_loss

        return indexer_loss(q.detach(), k.detach(), made["q_idx"], made["k_idx"], made["w"], topk=options["topk"],
                            cu_seqlens=cu_seqlens, reduction="mean")


MAKERS: dict[str, type] = {"nsa": NSAGates, "dsa": DSAIndexer}


def softmax_spec(method: object) -> MethodSpec:
    """The registry spec of a softmax-family method (anything but the linear family)."""
    spec = get_method(method)
    if spec.family == "linear":
        raise AttnkitError(
            f"method: {spec.name!r} is a linear-family method; use attnkit.layers.LinearAttention for it"
        )
    return spec


def required_fields(spec: MethodSpec) -> list[str]:
    return [f.name for f in dataclasses.fields(spec.options)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def make_inputs(spec: MethodSpec, options: dict[str, Any], q_features: int, k_features: int, num_heads: int,
                settings: Optional[dict[str, Any]] = None) -> Optional[nn.Module]:
    """The input maker for `spec`, after checking that `options` leaves it nothing to guess.

    Raises `OptionError` naming the option when the user passes an input that the layer makes,
    or when the method needs a tensor input that no maker produces."""
    names = {f.name for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise OptionError(f"{unknown[0]}: not an option of method {spec.name!r} (its options: {', '.join(sorted(names))})")
    maker_cls = MAKERS.get(spec.name)
    made = set(maker_cls.query_names + maker_cls.key_names) if maker_cls else set()
    for name in sorted(made & set(options)):
        raise OptionError(f"{name}: made by the layer from its input for method {spec.name!r}; do not pass it")
    missing = [n for n in required_fields(spec) if n not in options and n not in made]
    if missing:
        raise OptionError(f"{missing[0]}: required option of method {spec.name!r} is missing"
                          " (per-token tensor inputs can only be made for: " + ", ".join(sorted(MAKERS)) + ")")
    if maker_cls is None:
        if settings:
            raise OptionError(f"inputs: method {spec.name!r} takes no learned inputs, got {sorted(settings)}")
        return None
    try:
        return maker_cls(q_features, k_features, num_heads, options, **(settings or {}))
    except TypeError as e:
        raise OptionError(f"inputs: bad settings {settings} for method {spec.name!r}: {e}") from None


def check_options(spec: MethodSpec, options: dict[str, Any], inputs: Optional[nn.Module]) -> None:
    """Parse the options once up front, with the made inputs of a one-token dummy, so that
    unknown names and out-of-range values fail at construction (naming the option)."""
    dummy: dict[str, Any] = {}
    if inputs is not None:
        p = next(inputs.parameters())
        with torch.no_grad():
            dummy.update(inputs.query_inputs(torch.zeros(1, 1, inputs.q_features, device=p.device)))
            dummy.update(inputs.key_inputs(torch.zeros(1, 1, inputs.k_features, device=p.device)))
    spec.options.parse(spec.name, {**options, **dummy})

