"""Inputs and uniform call wrappers for the linear family's tests.

Every method is driven through the same three calls: `run(name, x, backend, ...)` for the
chunked / recurrent / fla forms, `step(name, x_t, state)` for decoding, and `options(name, x)`
for `attnkit.attention`. `x` is a dict of tensors: q, k, v, plus the method's gates (`g`,
`beta`) and `h0` (an initial state).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

import attnkit.linear as L

METHODS = ["linear_attention", "simple_gla", "lightning_attention", "gla", "delta_rule", "gated_delta_rule", "kda"]
DELTA = {"delta_rule", "gated_delta_rule", "kda"}
# gate layout per method: "scalar" -> g [B, T, H], "vector" -> g [B, T, H, K]
GATE = {"simple_gla": "scalar", "gla": "vector", "gated_delta_rule": "scalar", "kda": "vector"}
LIGHTNING = dict(layer_idx=1, num_layers=4)


def make_inputs(
    name: str,
    B: int = 2,
    T: int = 23,
    H: int = 2,
    K: int = 8,
    V: int = 6,
    dtype: torch.dtype = torch.float64,
    decay: str = "normal",
    with_state: bool = True,
    requires_grad: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """q, k, v (+ g, beta, h0). decay: "normal" (logsigmoid of N(0,1) + 1), "strong" (g in
    [-5, -4.5], near the -5 lower bound of fla's safe gates) or "none" (g = 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V)}
    if name in DELTA:
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    if name in GATE:
        shape = (B, T, H) if GATE[name] == "scalar" else (B, T, H, K)
        if decay == "strong":
            g = -5.0 + 0.5 * torch.rand(*shape, generator=gen, dtype=torch.float64)
        elif decay == "none":
            g = torch.zeros(*shape, dtype=torch.float64)
        else:
            g = F.logsigmoid(rnd(*shape) + 1.0)
        x["g"] = g
    if with_state:
        x["h0"] = 0.5 * rnd(B, H, K, V)
    out = {}
    for key, t in x.items():
        t = t.to(torch.float32 if key == "h0" and dtype != torch.float64 else dtype)
        out[key] = t.requires_grad_(requires_grad)
    return out


def grad_keys(x: dict[str, torch.Tensor]) -> list[str]:
    return [key for key in ("q", "k", "v", "g", "beta", "h0") if key in x]


def run(
    name: str,
    x: dict[str, torch.Tensor],
    backend: str = "chunk",
    chunk_size: int = 64,
    cu_seqlens: Optional[torch.Tensor] = None,
    use_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final_state) of a method on the inputs `x` with the given backend."""
    q, k, v = x["q"], x["k"], x["v"]
    kw: dict[str, Any] = dict(initial_state=x.get("h0") if use_state else None, output_final_state=True,
                              cu_seqlens=cu_seqlens, backend=backend)
    if backend != "reference":
        kw["chunk_size"] = chunk_size
    if name == "linear_attention":
        return L.linear_attention(q, k, v, **kw)
    if name == "simple_gla":
        return L.simple_gla(q, k, v, x["g"], **kw)
    if name == "lightning_attention":
        return L.lightning_attention(q, k, v, LIGHTNING["layer_idx"], LIGHTNING["num_layers"], **kw)
    if name == "gla":
        return L.gla(q, k, v, x["g"], **kw)
    if name == "delta_rule":
        return L.delta_rule(q, k, v, x["beta"], use_qk_l2norm_in_kernel=True, **kw)
    if name == "gated_delta_rule":
        return L.gated_delta_rule(q, k, v, x["g"], x["beta"], use_qk_l2norm_in_kernel=True, **kw)
    return L.kda(q, k, v, x["g"], x["beta"], use_qk_l2norm_in_kernel=True, **kw)


def step(name: str, x: dict[str, torch.Tensor], t: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode token t of `x` (passed with its T axis of 1) from `state`."""
    tok = {key: val[:, t : t + 1] for key, val in x.items() if key != "h0"}
    q, k, v = tok["q"], tok["k"], tok["v"]
    if name == "linear_attention":
        return L.linear_attention_step(q, k, v, state)
    if name == "simple_gla":
        return L.simple_gla_step(q, k, v, tok["g"], state)
    if name == "lightning_attention":
        g_gamma = L.lightning_decay(q.shape[2], LIGHTNING["layer_idx"], LIGHTNING["num_layers"])
        return L.simple_gla_step(q, k, v, None, state, g_gamma=g_gamma)
    if name == "gla":
        return L.gla_step(q, k, v, tok["g"], state)
    if name == "delta_rule":
        return L.delta_rule_step(q, k, v, tok["beta"], state, use_qk_l2norm_in_kernel=True)
    if name == "gated_delta_rule":
        return L.gated_delta_rule_step(q, k, v, tok["g"], tok["beta"], state, use_qk_l2norm_in_kernel=True)
    return L.kda_step(q, k, v, tok["g"], tok["beta"], state, use_qk_l2norm_in_kernel=True)


def options(name: str, x: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword options of `attnkit.attention(q, k, v, method=name, ...)` for the inputs `x`."""
    opts: dict[str, Any] = {key: x[key] for key in ("g", "beta") if key in x}
    if name in DELTA:
        opts["use_qk_l2norm_in_kernel"] = True
    if name == "lightning_attention":
        opts.update(LIGHTNING)
    return opts


def slice_tokens(x: dict[str, torch.Tensor], s: int, e: int, state_index: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Tokens s:e of packed inputs (B == 1), with initial state `state_index` of h0 when given."""
    out = {key: val[:, s:e] for key, val in x.items() if key != "h0"}
    if "h0" in x and state_index is not None:
        out["h0"] = x["h0"][state_index : state_index + 1]
    return out
