"""attnkit as a Hugging Face transformers attention implementation.

    import attnkit.hf
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")
    attnkit.hf.use(model, method="moba", topk=8)

Importing this module registers `"attnkit"` with transformers' `AttentionInterface` (the
attention function) and `AttentionMaskInterface` (the mask builder). transformers' attention
modules call the function with `query: [B, Hq, Tq, D]`, `key`/`value: [B, Hkv, Tk, D]` (after
RoPE and the cache update); the layouts are converted explicitly with `attnkit.from_bhtd` /
`to_bhtd`, GQA goes to attnkit as is (no `repeat_kv`), and the output is `[B, Tq, Hq, D]`.

attnkit methods implement causal (bottom-right aligned) or bidirectional attention. Padding is
served as variable length: the mask builder returns no mask when nothing is masked, and
otherwise the keys each row may see, `bool [B, Tk']` (`Tk' <= Tk`: a static cache's slots past
the newest query are cut off). The attention function then packs the real tokens of every row
and runs the method with `cu_seqlens` (prefill, training, encoders), or runs each row's real
tokens alone (cached decoding, `Tq < Tk`); padding queries get zeros and no gradient, real
tokens get what the unpadded sequence gives. The builder raises for anything else that would
change the result (packed sequences, sliding-window or custom mask overlays), and the attention
function for arguments it cannot honour (attention dropout, soft-capping, attention sinks,
returning weights, explicit 4D masks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..api import attention
from ..core.contract import AttnkitError, from_bhtd
from ..layers.method_inputs import check_options, make_inputs, softmax_spec
from ..registry import get_method
from .hf_version import require_transformers

require_transformers()

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
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise AttnkitError(
            f"attention_mask: attnkit takes padding as a 2D mask (the model's attention_mask), got an explicit mask "
            f"of shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype} (a custom pattern)")
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
    -> `(out [B, Tq, Hq, Dv], None)` through `attnkit.attention` with the module's method.
    `attention_mask` is None or the keys each row may see, `bool [B, Tk']` (`mask_interface`)."""
    _check_kwargs(attention_mask, dropout, kwargs)
    q, k, v = from_bhtd(query), from_bhtd(key), from_bhtd(value)  # [B, T, H, D]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    return attend(module, q, k, v, attention_mask, causal, scaling), None


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
           causal: bool, scale: Optional[float]) -> torch.Tensor:
    """`q [B, Tq, Hq, D]`, `k`/`v [B, Tk, Hkv, D]`, `key_mask` None or `bool [B, Tk']` -> `[B, Tq, Hq, Dv]`
    with the module's method (also the prefill of `attnkit.hf.kv_policy`)."""
    cfg: HFMethod = getattr(module, "attnkit", _DEFAULT)
    spec = get_method(cfg.method)
    if q.shape[1] < k.shape[1] and spec.family == "prefill":
        dense = q.shape[1] == 1 and spec.capabilities.decode_dense
        does = ("attends densely to the whole cache (its estimate needs the prompt's queries)" if dense else
                "runs it too, selecting key blocks for the new queries over the whole cache")
        _warn_once(("decode", cfg.method, dense), f"attnkit: {cfg.method!r} is a sparse-prefill method; a decode step "
                   f"({q.shape[1]} {'query' if q.shape[1] == 1 else 'queries'} over a longer cache) {does} (inside "
                   f"attnkit.hf.kv_policy, decode steps follow the policy instead).")
    if key_mask is None:
        return _run(module, cfg, q, k, v, causal, scale, None)
    B, Tq = q.shape[:2]
    tk = key_mask.shape[1]
    if tk > k.shape[1] or (tk < k.shape[1] and not causal) or key_mask.shape[0] != B:
        raise AttnkitError(f"attention_mask: expected [B={B}, Tk' <= {k.shape[1]}] (bool, keys that may be seen), "
                           f"got {tuple(key_mask.shape)}")
    k, v = k[:, :tk], v[:, :tk]  # a static cache's slots after the newest query: never visible
    if Tq == tk:  # self-attention: query i is key i
        return _run_packed(module, cfg, q, k, v, key_mask, causal, scale)
    if causal:
        q_mask = key_mask[:, tk - Tq:]  # the queries are the newest Tq tokens
    else:  # cross-attention: every query is real
        q_mask = torch.ones(B, Tq, dtype=torch.bool, device=q.device)
    return _run_rows(module, cfg, q, k, v, key_mask, q_mask, causal, scale)


def _made_inputs(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token method inputs (NSA gates, DSA indexer) of `q [B, Tq, Hq, D]`, `k [B, Tk, Hkv, D]`."""
    inputs = getattr(module, "attnkit_inputs", None)
    if inputs is None:
        return {}
    qf, kf = q.flatten(2), k.flatten(2)  # query states [B, Tq, Hq * D], every key present [B, Tk, Hkv * D]
    if inputs.detach_input:
        qf, kf = qf.detach(), kf.detach()
    return {**inputs.query_inputs(qf), **inputs.key_inputs(kf)}


def _run(module: nn.Module, cfg: HFMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
         scale: Optional[float], cu_seqlens: Optional[torch.Tensor],
         made: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """One `attnkit.attention` call (and the method inputs' auxiliary loss while training)."""
    made = _made_inputs(module, q, k) if made is None else made
    varlen = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    out = attention(q, k, v, method=cfg.method, causal=causal, scale=scale, backend=cfg.backend, **varlen,
                    **cfg.options, **made)
    inputs = getattr(module, "attnkit_inputs", None)
    module.attnkit_aux_loss = None
    if inputs is not None and module.training and torch.is_grad_enabled():
        module.attnkit_aux_loss = inputs.aux_loss(q, k, made, cfg.options, cu_seqlens)
    return out.contiguous()


def _run_packed(module: nn.Module, cfg: HFMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor, causal: bool, scale: Optional[float]) -> torch.Tensor:
    """Self-attention of padded rows (`Tq == Tk`, `valid [B, T]`): the real tokens of every row are
    packed into one varlen sequence `[1, sum(lengths), H, D]` (`cu_seqlens`), attended, and put back;
    padding rows stay 0 (and get no gradient)."""
    B, T, Hq = q.shape[:3]
    idx = valid.reshape(-1).nonzero().squeeze(1)  # [N] packed token -> flat (row, position)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu[1:] = valid.sum(1).cumsum(0)
    made = {name: t.flatten(0, 1)[idx].unsqueeze(0) for name, t in _made_inputs(module, q, k).items()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(0, 1)[idx].unsqueeze(0)

    out = _run(module, cfg, pack(q), pack(k), pack(v), causal, scale, cu, made)[0]  # [N, Hq, Dv]
    full = out.new_zeros(B * T, Hq, out.shape[-1]).index_put((idx,), out)
    return full.view(B, T, Hq, -1)


def _run_rows(module: nn.Module, cfg: HFMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor, q_mask: torch.Tensor, causal: bool, scale: Optional[float]) -> torch.Tensor:
    """Cached decoding of padded rows (`Tq < Tk`): each row's real queries over its real keys, alone.
    With causal attention the real queries are the row's newest real keys, so bottom-right alignment
    over the real tokens is the row's own causality."""
    B, Tq, Hq = q.shape[:3]
    made = _made_inputs(module, q, k)
    outs = []
    for b in range(B):
        qi, ki = q_mask[b].nonzero().squeeze(1), key_mask[b].nonzero().squeeze(1)
        row = {name: t[b:b + 1, (qi if t.shape[1] == Tq else ki)] for name, t in made.items()}
        out = q.new_zeros(1, Tq, Hq, v.shape[-1])
        if qi.numel():
            o = _run(module, cfg, q[b:b + 1, qi], k[b:b + 1, ki], v[b:b + 1, ki], causal, scale, None, row)
            out = out.index_put((torch.zeros_like(qi), qi), o[0])
        outs.append(out)
    return torch.cat(outs, 0)


_WARNED: set = set()


def _warn_once(key: Any, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


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
) -> Optional[torch.Tensor]:
    """The `AttentionMaskInterface` builder: None when every key is real and the queries are the
    newest tokens (attnkit applies causality itself); otherwise the keys each row may see,
    `bool [B, Tk']` with `Tk' = q_offset + q_length - kv_offset` under causal attention (a static
    cache's later slots are cut off). Raises for any other pattern."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function not in (causal_mask_function, bidirectional_mask_function) or local_size is not None:
        name = getattr(mask_function, "__qualname__", repr(mask_function))
        raise AttnkitError(
            f"attention_mask: attnkit supports plain causal or bidirectional attention (with padding), the model asked "
            f"for the mask pattern {name!r} (packed sequences from position_ids, a sliding window or a custom overlay)")
    causal = mask_function is causal_mask_function
    length = kv_length
    if causal:
        length = int(q_offset) + q_length - int(kv_offset)
        if not q_length <= length <= kv_length:
            raise AttnkitError(
                f"attention_mask: attnkit aligns causal attention bottom-right (queries are the newest tokens), got "
                f"q_offset={int(q_offset)}, q_length={q_length}, kv_offset={int(kv_offset)}, kv_length={kv_length} "
                "(a sliding cache?)")
    if attention_mask is None:
        if length == kv_length:
            return None
        device = kwargs.get("device")
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    keys = attention_mask[:, int(kv_offset): int(kv_offset) + length].bool()
    if keys.shape[1] < length:  # a mask shorter than the keys leaves the rest unmasked
        keys = torch.cat([keys, keys.new_ones(keys.shape[0], length - keys.shape[1])], 1)
    if keys.shape[0] != batch_size:
        keys = keys.expand(batch_size, -1)
    if length == kv_length and bool(keys.all()):
        return None
    return keys


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
    added = 0
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
            added += 1
        check_options(spec, options, made)
        m.attnkit = HFMethod(spec.name, dict(options), backend)
        m.attnkit_inputs = made
        m.attnkit_aux_loss = None
    if added:
        names = ", ".join(type(m.attnkit_inputs).__name__ for m in mods[:1])
        warnings.warn(
            f"attnkit.hf.use: {spec.name!r} added freshly initialised, untrained projections ({names}) to {added} "
            f"attention modules; a pretrained model does not have them, so its outputs are not meaningful until they "
            f"are trained (fine-tune with attnkit.hf.aux_losses, or load trained weights into module.attnkit_inputs)",
            UserWarning, stacklevel=2)
    return model


register()
