"""Registry rows for the linear/recurrent family (`attnkit.attention(..., method="gla", g=...)`).

Every method is causal only, has no softmax LSE, no GQA (q, k, v share their heads, as in fla's
chunked kernels), supports varlen, backward and decoding through its state. Backends in
preference order: `fla` (flash-linear-attention's Triton kernels, CUDA, optional), `chunk`
(the PyTorch chunked form), `reference` (the token-by-token recurrence). A backend returns
`o`, or `(o, final_state)` when `output_final_state=True`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..core.contract import AttentionCall, AttnkitError, OptionError
from ..registry import Backend, Capabilities, MethodOptions, MethodSpec, register
from .common import (
    check_beta,
    check_gate,
    check_state,
    num_states,
)
from .delta import FLA_KDA_MAX_HEAD_DIM, delta_rule, gated_delta_rule, kda
from .dispatch import DECLARED
from .gla import gla
from .linear_attn import linear_attention
from .simple_gla import lightning_attention, simple_gla

CAPS = Capabilities(causal=True, non_causal=False, gqa=False, varlen=True, backward=True, decode=True, lse=False)
STATE = "[N, H, K, V]"


def _bool(name: str, val: object) -> None:
    if not isinstance(val, bool):
        raise OptionError(f"{name}: expected a bool, got {type(val).__name__}")


def _chunk(val: object) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise OptionError(f"chunk_size: expected an int >= 1, got {val!r}")


def _required(method: str, name: str, val: object, layout: str) -> None:
    if val is None:
        raise OptionError(f"{name}: method {method!r} needs {name}={layout} (log-space gates, as in fla)"
                          if name == "g" else f"{name}: method {method!r} needs {name}={layout}")


def _as_option_error(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except OptionError:
        raise
    except AttnkitError as e:
        raise OptionError(str(e)) from None


def _check_call_common(opts: Any, call: AttentionCall) -> tuple[int, int, int, int, int]:
    B, T, H, K, V = call.batch, call.tq, call.hq, call.head_dim, call.head_dim_v
    if call.tq != call.tk:
        raise OptionError(
            f"k: linear-family methods need Tk == Tq (decode by passing initial_state and one token), "
            f"got Tq={call.tq}, Tk={call.tk}"
        )
    if opts.initial_state is not None:
        N = num_states(B, call.cu_seqlens)
        _as_option_error(lambda: check_state("initial_state", opts.initial_state, (N, H, K, V), call.q))
    return B, T, H, K, V


def _finish(o: torch.Tensor, state: Optional[torch.Tensor], output_final_state: bool) -> Any:
    return (o, state) if output_final_state else o


@dataclass(frozen=True)
class _StateOptions(MethodOptions):
    initial_state: Optional[torch.Tensor] = None
    output_final_state: bool = False
    chunk_size: int = 64

    def _check_common_fields(self) -> None:
        _bool("output_final_state", self.output_final_state)
        _chunk(self.chunk_size)


@dataclass(frozen=True)
class LinearAttentionOptions(_StateOptions):
    """`linear_attention`: state options plus `normalize` (divide by the running key sum)."""

    normalize: bool = False

    def __post_init__(self) -> None:
        self._check_common_fields()
        _bool("normalize", self.normalize)

    def check_call(self, call: AttentionCall) -> None:
        _check_call_common(self, call)
        if self.normalize and self.initial_state is not None:
            raise OptionError("initial_state: expected None when normalize=True (the key sum is not part of the state)"
                              ", got a tensor")


@dataclass(frozen=True)
class SimpleGLAOptions(_StateOptions):
    """`simple_gla`: `g [B, T, H]` or `g_gamma [H]` (log space), at most one."""

    g: Optional[torch.Tensor] = None
    g_gamma: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self._check_common_fields()
        if self.g is not None and self.g_gamma is not None:
            raise OptionError("g_gamma: expected None when g is given (pass one of g [B, T, H] or g_gamma [H])")

    def check_call(self, call: AttentionCall) -> None:
        B, T, H, _, _ = _check_call_common(self, call)
        if self.g is not None:
            _as_option_error(lambda: check_gate("g", self.g, (B, T, H), call.q, "[B, T, H]"))
        if self.g_gamma is not None:
            _as_option_error(lambda: check_gate("g_gamma", self.g_gamma, (H,), call.q, "[H]"))


@dataclass(frozen=True)
class LightningOptions(_StateOptions):
    """`lightning_attention`: fla's constant per-head decay from `layer_idx` and `num_layers`."""

    layer_idx: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        self._check_common_fields()
        for name in ("layer_idx", "num_layers"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise OptionError(f"{name}: method 'lightning_attention' needs an int {name}, got {val!r}")
        if self.num_layers < 1:  # type: ignore[operator]
            raise OptionError(f"num_layers: expected an int >= 1, got {self.num_layers}")
        if not 0 <= self.layer_idx < self.num_layers:  # type: ignore[operator]
            raise OptionError(f"layer_idx: expected an int in [0, num_layers={self.num_layers}), got {self.layer_idx}")

    def check_call(self, call: AttentionCall) -> None:
        _check_call_common(self, call)


@dataclass(frozen=True)
class GLAOptions(_StateOptions):
    """`gla`: `g [B, T, H, K]` (log space, required)."""

    g: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        self._check_common_fields()
        _required("gla", "g", self.g, "[B, T, H, K]")

    def check_call(self, call: AttentionCall) -> None:
        B, T, H, K, _ = _check_call_common(self, call)
        _as_option_error(lambda: check_gate("g", self.g, (B, T, H, K), call.q, "[B, T, H, K]"))


@dataclass(frozen=True)
class DeltaRuleOptions(_StateOptions):
    """`delta_rule`: `beta [B, T, H]` in [0, 1] (required), optional in-kernel q/k L2 norm."""

    beta: Optional[torch.Tensor] = None
    use_qk_l2norm_in_kernel: bool = False

    def __post_init__(self) -> None:
        self._check_common_fields()
        _bool("use_qk_l2norm_in_kernel", self.use_qk_l2norm_in_kernel)
        _required(self._method(), "beta", self.beta, "[B, T, H]")
        self._check_gate_field()

    def _method(self) -> str:
        return "delta_rule"

    def _check_gate_field(self) -> None:
        pass

    def check_call(self, call: AttentionCall) -> None:
        B, T, H, _, _ = _check_call_common(self, call)
        _as_option_error(lambda: check_beta(self.beta, (B, T, H), call.q))


@dataclass(frozen=True)
class GatedDeltaRuleOptions(DeltaRuleOptions):
    """`gated_delta_rule`: `g [B, T, H]` (log space) and `beta [B, T, H]`, both required."""

    g: Optional[torch.Tensor] = None

    def _method(self) -> str:
        return "gated_delta_rule"

    def _check_gate_field(self) -> None:
        _required(self._method(), "g", self.g, "[B, T, H]")

    def check_call(self, call: AttentionCall) -> None:
        super().check_call(call)
        B, T, H = call.batch, call.tq, call.hq
        _as_option_error(lambda: check_gate("g", self.g, (B, T, H), call.q, "[B, T, H]"))


@dataclass(frozen=True)
class KDAOptions(DeltaRuleOptions):
    """`kda`: `g [B, T, H, K]` (log space, per channel) and `beta [B, T, H]`, both required."""

    g: Optional[torch.Tensor] = None

    def _method(self) -> str:
        return "kda"

    def _check_gate_field(self) -> None:
        _required(self._method(), "g", self.g, "[B, T, H, K]")

    def check_call(self, call: AttentionCall) -> None:
        super().check_call(call)
        B, T, H, K = call.batch, call.tq, call.hq, call.head_dim
        _as_option_error(lambda: check_gate("g", self.g, (B, T, H, K), call.q, "[B, T, H, K]"))


# --- runners ----------------------------------------------------------------------------------


def _runner(method: str, backend: str) -> Callable[[AttentionCall, Any], Any]:
    def run(call: AttentionCall, o: Any) -> Any:
        common = dict(scale=call.scale, initial_state=o.initial_state, output_final_state=o.output_final_state)
        kw: dict[str, Any] = dict(cu_seqlens=call.cu_seqlens, backend=backend)
        if backend != "reference":
            kw["chunk_size"] = o.chunk_size
        q, k, v = call.q, call.k, call.v
        if method == "linear_attention":
            out = linear_attention(q, k, v, normalize=o.normalize, **common, **kw)
        elif method == "simple_gla":
            out = simple_gla(q, k, v, o.g, o.g_gamma, **common, **kw)
        elif method == "lightning_attention":
            out = lightning_attention(q, k, v, o.layer_idx, o.num_layers, **common, **kw)
        elif method == "gla":
            out = gla(q, k, v, o.g, **common, **kw)
        elif method == "delta_rule":
            out = delta_rule(q, k, v, o.beta, use_qk_l2norm_in_kernel=o.use_qk_l2norm_in_kernel, **common, **kw)
        elif method == "gated_delta_rule":
            out = gated_delta_rule(q, k, v, o.g, o.beta, use_qk_l2norm_in_kernel=o.use_qk_l2norm_in_kernel,
                                   **common, **kw)
        else:
            out = kda(q, k, v, o.g, o.beta, use_qk_l2norm_in_kernel=o.use_qk_l2norm_in_kernel, **common, **kw)
        return _finish(out[0], out[1], o.output_final_state)

    return run


def _fla_supports(method: str) -> Callable[[AttentionCall, Any], Optional[str]]:
    def supports(call: AttentionCall, opts: Any) -> Optional[str]:
        if method == "linear_attention" and opts.normalize:
            return "normalize=True is computed by attnkit (running key sum), not by fla"
        if method == "kda" and call.head_dim > FLA_KDA_MAX_HEAD_DIM:
            return f"fla's kda supports head dim K <= {FLA_KDA_MAX_HEAD_DIM}, got K={call.head_dim}"
        return None

    return supports


def _backends(method: str) -> tuple[Backend, ...]:
    """The direct calls' forms (`dispatch.DECLARED`: same devices, dtypes, packages), run from a
    registry call; fla's option checks read the method's options."""
    return tuple(dataclasses.replace(form, run=_runner(method, form.name),
                                     supports=_fla_supports(method) if form.name == "fla" else None)
                 for form in DECLARED)


_ROWS = [
    ("linear_attention", "Transformers are RNNs (Katharopoulos et al., 2020)",
     "S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; optional key-sum normalisation", LinearAttentionOptions),
    ("simple_gla", "RetNet; Lightning Attention-2; GLA (scalar gate)",
     "scalar per-head log decay g [B,T,H] (or constant g_gamma [H]): S_t = exp(g_t) S_{t-1} + k_t v_t^T",
     SimpleGLAOptions),
    ("lightning_attention", "Lightning Attention-2 (Qin et al., 2024)",
     "simple_gla with fla's constant per-head decay from layer_idx / num_layers", LightningOptions),
    ("gla", "Gated Linear Attention (Yang et al., 2024)",
     "per-channel log decay g [B,T,H,K]: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T", GLAOptions),
    ("delta_rule", "DeltaNet (Yang et al., 2024)",
     "S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T; WY/UT chunked form", DeltaRuleOptions),
    ("gated_delta_rule", "Gated Delta Networks (Yang et al., 2025)",
     "delta rule with scalar decay exp(g_t) on S_{t-1}, g [B,T,H]", GatedDeltaRuleOptions),
    ("kda", "Kimi Linear: Kimi Delta Attention (2025)",
     "delta rule with per-channel decay diag(exp(g_t)) on S_{t-1}, g [B,T,H,K]", KDAOptions),
]

def _example(method: str) -> Callable[[AttentionCall], dict[str, Any]]:
    """Seeded gates for the benchmark and the smoke tests: decays in log space near fla's usual
    range (logsigmoid / 16, so memory spans tens of tokens), beta = sigmoid(.)."""

    def example(call: AttentionCall) -> dict[str, Any]:
        B, T, H, K = call.batch, call.tq, call.hq, call.head_dim
        gen = torch.Generator(device=call.device).manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=call.device, dtype=torch.float32)

        decay = lambda *shape: (torch.nn.functional.logsigmoid(rand(*shape)) / 16).to(call.dtype)
        beta = lambda: torch.sigmoid(rand(B, T, H)).to(call.dtype)
        return {
            "linear_attention": lambda: {},
            "simple_gla": lambda: {"g": decay(B, T, H)},
            "lightning_attention": lambda: {"layer_idx": 0, "num_layers": 2},
            "gla": lambda: {"g": decay(B, T, H, K)},
            "delta_rule": lambda: {"beta": beta(), "use_qk_l2norm_in_kernel": True},
            "gated_delta_rule": lambda: {"g": decay(B, T, H), "beta": beta(), "use_qk_l2norm_in_kernel": True},
            "kda": lambda: {"g": decay(B, T, H, K), "beta": beta(), "use_qk_l2norm_in_kernel": True},
        }[method]()

    return example


for _name, _paper, _summary, _opts in _ROWS:
    register(MethodSpec(name=_name, family="linear", paper=_paper, summary=_summary, options=_opts,
                        capabilities=CAPS, backends=_backends(_name), docs=f"docs/methods/{_name}.md", tier=1,
                        example=_example(_name)))
