"""Hugging Face `generate` with an attnkit KV policy, through transformers' own hooks.

    from attnkit.integrations.hf_kv import kv_policy
    with kv_policy(model, "snapkv", budget=0.25, obs_window=8) as kv:
        out = model.generate(input_ids, max_new_tokens=32)
    kv.memory()["kept"]      # bytes of keys and values the policy kept

How it plugs in (no model code is patched):
- a `transformers.Cache` subclass (`PolicyCache`) whose layers append the new keys/values to an
  attnkit `KVCache` (paged, per KV head) and hand back only the new states;
- an attention function registered with `AttentionInterface` (and `sdpa_mask` with
  `AttentionMaskInterface`) under the name `attnkit_kv`, set on the model for the duration of
  the context: at prefill it runs SDPA over the prompt then lets the policy compress the layer
  (padding is dropped); at decode it runs `KVSession.attend` (policy eviction, sparse reading,
  `ops.decode_attention`);
- a forward pre-hook on the model that gives each new generation a fresh `PolicyCache` in
  place of the empty `DynamicCache` that `generate` (or the model) would create.
`get_seq_length` reports the tokens *seen*, so positions and masks stay those of the full
sequence while the cache holds fewer tokens. Works for Llama / Qwen2 / Mistral-style models
(attention modules with `layer_idx`, keys after RoPE, `[B, H, T, D]` states).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional, Union

import torch

from ..core.contract import AttnkitError, OptionError
from ..kv.policies import POLICIES, EvictionPolicy, Razor, get_policy
from ..kv.razor_heads import head_scores, retrieval_heads
from ..kv.session import KVSession
from ..kv.sparse import Quest, Reader, Recycled, Routed, Santa
from .hf_attention import attend
from .hf_version import require_transformers

require_transformers()
try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("attnkit.integrations.hf_kv needs transformers >= 5 (pip install attnkit[hf])") from e

NAME = "attnkit_kv"
READERS: dict[str, type] = {"quest": Quest, "recycled": Recycled, "santa": Santa, "routed": Routed}
_HANDLES: dict[int, "KVPolicyHandle"] = {}  # id(attention module) -> the active handle


class _PolicyLayer(CacheLayerMixin):
    """One model layer of a `PolicyCache`: appends to the attnkit cache, returns the new states."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, session: KVSession, layer_idx: int) -> None:
        super().__init__()
        self.session, self.layer_idx = session, layer_idx
        self.new_tokens = 0
        self.length = 0  # tokens seen, padding included (transformers' positions); the cache counts real ones

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """`key_states [B, Hkv, Tn, D]` -> appended (attnkit layout `[B, Tn, Hkv, D]`); returns them as is."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.session.cache.append(self.layer_idx, key_states.transpose(1, 2), value_states.transpose(1, 2))
        self.new_tokens = key_states.shape[-2]
        self.length += self.new_tokens
        return key_states, value_states

    @property
    def prefill(self) -> bool:
        """Whether the last update was the prompt (the first one)."""
        return self.length == self.new_tokens

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name transformers < 5.2x gives get_max_length
        return -1

    def reset(self) -> None:
        raise AttnkitError("cache: a PolicyCache cannot be reset; leave the kv_policy context and start a new one")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise AttnkitError("cache: beam search is not supported with an attnkit KV policy")


class PolicyCache(Cache):
    """A transformers `Cache` backed by an attnkit `KVSession` (one per generation)."""

    def __init__(self, session: KVSession, num_layers: int) -> None:
        super().__init__(layers=[_PolicyLayer(session, i) for i in range(num_layers)])
        self.session = session


class KVPolicyHandle:
    """What `kv_policy` yields: the policy, and the cache of the latest generation."""

    def __init__(self, model: Any, policy: Optional[EvictionPolicy], reader: Optional[Reader], backend: str) -> None:
        self.model, self.policy, self.reader, self.backend = model, policy, reader, backend
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = int(cfg.num_hidden_layers)
        self.cache: Optional[PolicyCache] = None
        self.active: Optional[PolicyCache] = None
        self.probe: Optional[dict[int, tuple[torch.Tensor, torch.Tensor]]] = None
        self.probe_period = 0

    @property
    def session(self) -> KVSession:
        if self.cache is None:
            raise AttnkitError("cache: nothing generated yet inside this kv_policy context")
        return self.cache.session

    def new_cache(self) -> PolicyCache:
        self.cache = PolicyCache(KVSession(self.policy, self.reader, backend=self.backend, num_layers=self.num_layers),
                                 self.num_layers)
        return self.cache

    def memory(self) -> dict[str, int]:
        """Bytes of the latest generation's cache (`kept`, `pages`, `metadata`, `reserved`)."""
        return self.session.memory()

    def num_kept(self) -> dict[int, torch.Tensor]:
        """Tokens kept per layer and KV head: `{layer: [B, Hkv]}`."""
        return self.session.cache.num_kept()


# --- the attention function ----------------------------------------------------------------------


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
               **kwargs: Any):
    """`query [B, Hq, Tq, D]`; `key`/`value` are the new states (PolicyCache) -> `([B, Tq, Hq, Dv], None)`."""
    handle = _HANDLES.get(id(module))
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer_idx = getattr(module, "layer_idx", None)
    if handle is not None and handle.probe is not None:
        handle.probe[layer_idx] = head_scores(query.transpose(1, 2), key.transpose(1, 2), handle.probe_period, scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if handle is None or handle.active is None:  # no cache: a plain forward (training, scoring)
        if getattr(module, "attnkit", None) is not None:
            key_ok = _real_keys(attention_mask, key.shape[0], key.shape[2], key.device)
            out = attend(module, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                         None if bool(key_ok.all()) else key_ok, bool(getattr(module, "is_causal", True)), scale)
            return out, None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    session = handle.active.session
    cache_layer: _PolicyLayer = handle.active.layers[layer_idx]
    q = query.transpose(1, 2)  # [B, Tq, Hq, D]
    if cache_layer.prefill:  # the prompt attends to itself in full, then compression
        key_ok = _real_keys(attention_mask, key.shape[0], key.shape[2], key.device)
        if getattr(module, "attnkit", None) is not None:  # attnkit.hf.use(model, method): sparse prefill
            out = attend(module, q, key.transpose(1, 2), value.transpose(1, 2),
                         None if bool(key_ok.all()) else key_ok, True, scale)
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scale,
                                            **kwargs)
        _drop_padding(session.cache.layer(layer_idx), key_ok)
        session.compress(layer_idx, q, scale)
        return out, None
    return session.attend(layer_idx, q, scale), None


def _real_keys(attention_mask: Optional[torch.Tensor], batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The prompt's real tokens, `bool [B, T]`, from the mask `sdpa_mask` built (None: all real).
    The last query's row masks exactly the padding keys (with left padding it is a real token)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        raise AttnkitError(f"attention_mask: expected the boolean 4D mask of sdpa_mask, got {attention_mask.dtype} "
                           f"{tuple(attention_mask.shape)}")
    return attention_mask[:, 0, -1, :length].expand(batch, length)


def _drop_padding(layer: Any, key_ok: torch.Tensor) -> None:
    """Evict the prompt's padding and count each row's positions from its first real token, so
    that sinks, windows and observation windows mean the same in a padded batch as alone. Only
    left padding (generate's `padding_side="left"`) is served: the prompt's queries are then the
    newest tokens of every row."""
    if bool(key_ok.all()):
        return
    started = key_ok.long().cumsum(1) > 0
    if bool((started & ~key_ok).any()):
        raise AttnkitError("attention_mask: a KV policy serves left-padded prompts (tokenizer padding_side='left'), "
                           "got padding after or between real tokens")
    lg = layer.logical()
    pos = lg["pos"]  # [B, Hkv, L]
    bad = lg["valid"] & ~key_ok.gather(1, pos.clamp_min(0).flatten(1)).view_as(pos)
    L = pos.shape[-1]
    layer.evict(torch.where(bad, torch.arange(L, device=pos.device), -1))
    layer.renumber(key_ok.long().cumsum(1) - 1)


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


# --- razor: find retrieval heads with a probe ----------------------------------------------------


@torch.no_grad()
def probe_retrieval_heads(model: Any, handle: KVPolicyHandle, period: int = 64, batch: int = 2, seed: int = 0,
                          induction_ratio: float = 0.14, echo_ratio: float = 0.01) -> torch.Tensor:
    """Run the model once on random tokens repeated twice and score echo / induction heads
    (`kv.razor_heads`). Returns bool `[L, Hkv]`."""
    cfg = model.config.get_text_config(decoder=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(cfg.vocab_size), (batch, period), generator=g)
    ids = torch.cat([ids, ids], 1).to(next(model.parameters()).device)
    handle.probe, handle.probe_period = {}, period
    try:
        model(input_ids=ids, use_cache=False)
        scores = handle.probe
    finally:
        handle.probe = None
    if len(scores) != handle.num_layers:
        raise AttnkitError(f"model: the probe reached {len(scores)} of {handle.num_layers} attention layers")
    echo = torch.stack([scores[i][0] for i in range(handle.num_layers)])
    ind = torch.stack([scores[i][1] for i in range(handle.num_layers)])
    return retrieval_heads(echo.cpu(), ind.cpu(), induction_ratio, echo_ratio)


# --- the context manager -------------------------------------------------------------------------


def attention_modules(model: Any) -> list[torch.nn.Module]:
    """The attention modules of a decoder (modules with an integer `layer_idx` and a `q_proj`)."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "q_proj")]
    if not mods:
        raise AttnkitError(f"model: found no attention modules (with layer_idx and q_proj) in {type(model).__name__}")
    return mods


def _make_policy(policy: Union[str, EvictionPolicy, Reader], options: dict[str, Any]
                 ) -> tuple[Optional[EvictionPolicy], Optional[Reader]]:
    if isinstance(policy, Reader):
        return None, policy
    if isinstance(policy, str) and policy in READERS:
        return None, READERS[policy](**options)
    if isinstance(policy, str) and policy not in POLICIES:
        raise OptionError(f"policy: expected one of {sorted(POLICIES) + sorted(READERS)}, got {policy!r}")
    return get_policy(policy, **options), None


# the model's cache argument: `cache` from transformers 5.2x on (where `past_key_values` is
# deprecated and ignored when both are set), `past_key_values` before
_CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: Any) -> str:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def kv_policy(model: Any, policy: Union[str, EvictionPolicy, Reader], *, backend: str = "auto",
              probe_period: int = 64, **options: Any) -> Iterator[KVPolicyHandle]:
    """Run `model` (its `generate` included) with a KV policy inside the context.

    `policy`: an eviction policy name (`streaming`, `h2o`, `snapkv`, `razor`) or a sparse reader
    (`quest`, `recycled`, `santa`, `routed`), with its options as keywords (`budget=0.25`), or an
    instance. Razor without `retrieval_heads` finds them with a probe (`probe_period` tokens
    repeated twice). The model's attention implementation is restored on exit."""
    evict, reader = _make_policy(policy, options)
    register()
    handle = KVPolicyHandle(model, evict, reader, backend)
    mods = attention_modules(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    for m in mods:
        if id(m) in _HANDLES:
            raise AttnkitError("model: a kv_policy context is already active on this model")
        _HANDLES[id(m)] = handle

    cache_arg = cache_argument(model)

    def pre_hook(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        given = [kwargs[n] for n in _CACHE_ARGUMENTS if kwargs.get(n) is not None]
        pkv = given[0] if given else None
        use_cache = kwargs.get("use_cache", getattr(model.config, "use_cache", True))
        if isinstance(pkv, PolicyCache):
            handle.active = pkv
        elif handle.probe is not None or (pkv is None and not use_cache):
            handle.active = None
        elif pkv is None or (isinstance(pkv, Cache) and pkv.get_seq_length() == 0):
            for n in _CACHE_ARGUMENTS:  # one cache, under the name this transformers reads
                kwargs.pop(n, None)
            kwargs[cache_arg] = handle.active = handle.new_cache()
        else:
            raise AttnkitError(f"{cache_arg}: a kv_policy context needs a fresh cache (got a filled "
                               f"{type(pkv).__name__})")
        return args, kwargs

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        if isinstance(evict, Razor) and evict.retrieval_heads is None:
            evict.retrieval_heads = probe_retrieval_heads(model, handle, period=probe_period)
        yield handle
    finally:
        hook.remove()
        for m in mods:
            _HANDLES.pop(id(m), None)
        handle.active = None
        model.set_attn_implementation(previous)
