"""Hybrid stacks: per-layer method patterns and ratios, and the mixer factory."""

from __future__ import annotations

import pytest

from attnkit.core.contract import AttnkitError
from attnkit.layers import Attention, LinearAttention, layer_methods, make_mixer


def test_pattern_repeats_over_depth() -> None:
    assert layer_methods("gla,gla,gla,dense", 8) == ["gla", "gla", "gla", "dense"] * 2
    assert layer_methods("dense", 3) == ["dense"] * 3
    assert layer_methods(["kda", "moba"], 4) == ["kda", "moba", "kda", "moba"]


@pytest.mark.parametrize("ratio", [3, 4, 5, 6])
def test_ratio(ratio: int) -> None:
    got = layer_methods(f"{ratio}:1", 2 * (ratio + 1), linear="gated_delta_rule", full="moba")
    assert got == (["gated_delta_rule"] * ratio + ["moba"]) * 2


def test_bad_patterns_raise() -> None:
    with pytest.raises(AttnkitError, match="num_layers"):
        layer_methods("gla,dense", 3)
    with pytest.raises(AttnkitError, match="method"):
        layer_methods("gla,nope", 2)
    with pytest.raises(AttnkitError, match="layers"):
        layer_methods("gla,,dense", 3)


def test_make_mixer_picks_the_layer_kind() -> None:
    assert isinstance(make_mixer("gla", 32, 4), LinearAttention)
    m = make_mixer("moba", 32, 4, 2, method_options={"block_size": 4, "topk": 2}, attention_kwargs={"output_gate": True})
    assert isinstance(m, Attention) and m.num_kv_heads == 2 and m.g_proj is not None
