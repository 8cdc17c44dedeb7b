"""attnkit as a Hugging Face transformers attention implementation.

    import attnkit.hf
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")
    attnkit.hf.use(model, method="moba", topk=8)

Importing this module registers `"attnkit"` with transformers' `AttentionInterface` (the
attention function) and `AttentionMaskInterface` (the mask builder). transformers' attention
modules call the function with `query: [B, Hq, Tq, D]`, `key`/`value: [B, Hkv, Tk, D]` (after
RoPE and the cache update); the layouts are converted explicitly with `attnkit.from_bhtd` /
`to_bhtd`, GQA goes to attnkit as is (no `repeat_kv`), and the output is `[B, Tq, Hq, D]`.

attnkit methods implement causal (bottom-right aligned) or bidirectional attention, nothing
else, so the mask builder returns no mask for exactly those patterns and raises for anything
that would change the result: padding in the attention mask, packed sequences, sliding-window
or custom mask overlays. The attention function likewise raises for arguments it cannot honour
(attention dropout, soft-capping, attention sinks, returning weights, explicit 4D masks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..api import attention
from ..core.contract import AttnkitError, from_bhtd
from ..layers.method_inputs import check_options, make_inputs, softmax_spec

NAME = "attnkit"
# kwargs transformers passes that do not change the attention of the given q, k, v
_NEUTRAL = {"position_ids", "use_cache", "cache_position", "output_hidden_states", "return_dict"}
# kwargs that would change the result: allowed only at their neutral value
_OFF: dict[str, Callable[[Any], bool]] = {
    "softcap": lambda x: x is None,
    "sliding_window": lambda x: x is None,
    "s_aux": lambda x: x is None,
    "position_bias": lambda x: x is None,
    "head_mask": lambda x: x is None,
    "output_attentions": lambda x: not x,
}
_PROJ_Q = ("q_proj", "query")
_PROJ_K = ("k_proj", "key")


@dataclass(frozen=True)
class HFMethod:
    """The method an attention module runs through attnkit, with its fixed options."""

    method: str = "dense"
    options: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"


_DEFAULT = HFMethod()


def _check_kwargs(attention_mask: Optional[torch.Tensor], dropout: float, kwargs: dict[str, Any]) -> None:
    if attention_mask is not None:
        raise AttnkitError(
            f"attention_mask: attnkit runs causal or bidirectional attention without an explicit mask, got a mask of "
            f"shape {tuple(attention_mask.shape)} (padding, packing or a custom pattern); pass unpadded inputs")
    if dropout:
        raise AttnkitError(f"dropout: attnkit has no attention dropout, got p={dropout} "
                           "(set config.attention_dropout=0.0, or call model.eval())")
    for name, value in kwargs.items():
        if name in _NEUTRAL:
            continue
        ok = _OFF.get(name)
        if ok is None:
            if value is None:
                continue
            raise AttnkitError(f"{name}: argument not supported by the attnkit attention implementation (got {value!r})")
        if not ok(value):
            raise AttnkitError(f"{name}: not supported by the attnkit attention implementation, got {value!r}")


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` function: `query [B, Hq, Tq, D]`, `key`/`value [B, Hkv, Tk, D]`
    -> `(out [B, Tq, Hq, Dv], None)` through `attnkit.attention` with the module's method."""
    _check_kwargs(attention_mask, dropout, kwargs)
    cfg: HFMethod = getattr(module, "attnkit", _DEFAULT)
    q, k, v = from_bhtd(query), from_bhtd(key), from_bhtd(value)  # [B, T, H, D]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    made: dict[str, torch.Tensor] = {}
    inputs = getattr(module, "attnkit_inputs", None)
    if inputs is not None:
        qf, kf = q.flatten(2), k.flatten(2)  # query states [B, Tq, Hq * D], every key present [B, Tk, Hkv * D]
        if inputs.detach_input:
            qf, kf = qf.detach(), kf.detach()
        made.update(inputs.query_inputs(qf))
        made.update(inputs.key_inputs(kf))
    out = attention(q, k, v, method=cfg.method, causal=causal, scale=scaling, backend=cfg.backend,
                    **cfg.options, **made)
    module.attnkit_aux_loss = None
    if inputs is not None and module.training and torch.is_grad_enabled():
        module.attnkit_aux_loss = inputs.aux_loss(q, k, made, cfg.options, None)
    return out.contiguous(), None


def mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    **kwargs: Any,
) -> None:
    """The `AttentionMaskInterface` builder: no mask (attnkit applies causality itself), after
    checking that the requested mask is exactly plain causal or bidirectional attention."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function not in (causal_mask_function, bidirectional_mask_function) or local_size is not None:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise AttnkitError(
            f"attention_mask: attnkit supports plain causal or bidirectional attention, the model asked for the mask "
            f"pattern {name!r} (packed sequences from position_ids, a sliding window or a custom overlay)")
    if attention_mask is not None:
        pad = attention_mask[:, kv_offset: kv_offset + kv_length]
        if not bool(pad.bool().all()):
            rows = (~pad.bool()).any(-1).nonzero().flatten().tolist()
            raise AttnkitError(
                f"attention_mask: padding (zeros) in batch rows {rows}; attnkit methods cannot honour padding masks, "
                "run unpadded inputs (batch size 1 or equal lengths)")
    if mask_function is causal_mask_function and int(q_offset) + q_length != int(kv_offset) + kv_length:
        raise AttnkitError(
            f"attention_mask: attnkit aligns causal attention bottom-right (queries are the last tokens), got "
            f"q_offset={int(q_offset)}, q_length={q_length}, kv_offset={int(kv_offset)}, kv_length={kv_length} "
            "(a static or sliding cache?); use a DynamicCache")
    return None


def aux_losses(model: nn.Module) -> list[torch.Tensor]:
    """The auxiliary losses of the last training forward (DSA's indexer loss), one per module
    that has one: add them to the model's loss to train the method inputs that need it."""
    return [m.attnkit_aux_loss for m in attention_modules(model) if getattr(m, "attnkit_aux_loss", None) is not None]


def register() -> None:
    """Register `"attnkit"` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a transformers model: modules with a `layer_idx` and q/k projections."""
    return [m for m in model.modules()
            if hasattr(m, "layer_idx") and any(isinstance(getattr(m, p, None), nn.Linear) for p in _PROJ_Q)]


def _proj(module: nn.Module, names: Sequence[str]) -> nn.Linear:
    for n in names:
        p = getattr(module, n, None)
        if isinstance(p, nn.Linear):
            return p
    raise AttnkitError(f"model: attention module {type(module).__name__} has none of the projections {list(names)}")


def use(model: nn.Module, method: str = "dense", *, layers: Optional[Sequence[int]] = None, backend: str = "auto",
        inputs: Optional[dict[str, Any]] = None, **options: Any) -> nn.Module:
    """Run the attention of `model` (all layers, or the `layers` indices) through attnkit's
    `method` with `options`; returns the model.

    Switches the model to `attn_implementation="attnkit"` if needed. Options are validated now
    (a bad name or value raises `OptionError` naming it). Methods with per-token tensor inputs
    (NSA gates, DSA's indexer) get learned projections of the query / key states, added to each
    attention module as `attnkit_inputs` (trainable, on the module's device and dtype)."""
    register()
    spec = softmax_spec(method)
    mods = attention_modules(model)
    if not mods:
        raise AttnkitError(f"model: no attention modules found in {type(model).__name__} (modules with layer_idx and q_proj)")
    if layers is not None:
        wanted = set(layers)
        known = {m.layer_idx for m in mods}
        if not wanted <= known:
            raise AttnkitError(f"layers: expected layer indices in {sorted(known)}, got {sorted(wanted - known)}")
        mods = [m for m in mods if m.layer_idx in wanted]
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
        if cfg._attn_implementation != NAME:
            raise AttnkitError(f"model: {type(model).__name__} cannot switch to attn_implementation={NAME!r}")
    for m in mods:
        q_proj, k_proj = _proj(m, _PROJ_Q), _proj(m, _PROJ_K)
        heads = getattr(getattr(m, "config", None), "num_attention_heads", None)
        if heads is None:
            raise AttnkitError(f"model: cannot read num_attention_heads from {type(m).__name__}.config")
        made = make_inputs(spec, options, q_proj.out_features, k_proj.out_features, heads, inputs)
        if made is not None:
            made.to(device=q_proj.weight.device, dtype=q_proj.weight.dtype)
        check_options(spec, options, made)
        m.attnkit = HFMethod(spec.name, dict(options), backend)
        m.attnkit_inputs = made
        m.attnkit_aux_loss = None
    return model


register()
