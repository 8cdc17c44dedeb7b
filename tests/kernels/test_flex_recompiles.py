"""FlexAttention must never fall back to its unfused eager path (which materialises the full
`[B, H, Tq, Tk]` scores) because torch.compile hit its recompile limit: `ops._flex.call_compiled`
raises the limit for attnkit's calls and turns hitting it into an error. Checked on the CPU with
the process-wide limit lowered to 1, so that a second shape would fall back without the guard
(compiled FlexAttention on the CPU supports inference without the LSE, which is what this uses)."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnkit.core.contract import validate_attention
from attnkit.core.selection import KVSelection
from attnkit.core import availability
from attnkit.ops import _flex


def test_compiled_flex_keeps_compiling_past_the_default_limit() -> None:
    import torch._dynamo.config as dynamo_config

    if availability.flex():
        pytest.fail(f"FlexAttention unavailable: {availability.flex()}")
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    flex = torch.compile(torch.nn.attention.flex_attention.flex_attention, dynamic=False)
    # dynamo's own patch context (not monkeypatch: the config module's aliases do not survive its undo)
    with dynamo_config.patch(**{name: 1}), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for T in (128, 256):  # two shapes: two compilations, one past the lowered limit
            q, k, v = torch.randn(1, 2, T, 16), torch.randn(1, 1, T, 16), torch.randn(1, 1, T, 16)
            call = validate_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            idx = torch.arange(T // 128, dtype=torch.int32).view(1, 1, 1, -1).expand(1, 1, T // 128, -1).contiguous()
            bm = _flex.selection_block_mask(KVSelection(idx, 128, 128), 1, 2, 1, T, T, True, None)
            out = _flex.call_compiled(flex, q, k, v, block_mask=bm, scale=call.scale, enable_gqa=True)
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            assert (out - ref).abs().max() < 1e-4, f"T={T}: compiled flex differs from SDPA"
    fallbacks = [str(w.message) for w in caught if "without torch.compile" in str(w.message)]
    assert not fallbacks, f"FlexAttention fell back to its unfused eager path: {fallbacks[0][:120]}"
