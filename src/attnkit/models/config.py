"""`DecoderConfig`: the reference decoder LM's hyper-parameters, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.contract import AttnkitError
from ..layers.hybrid import layer_methods


@dataclass
class DecoderConfig:
    """A Llama-style decoder: pre-norm blocks of (RMSNorm, token mixer) and (RMSNorm, SwiGLU).

    `layers` picks each block's mixer (`attnkit.layers.layer_methods`): `"dense"`, a pattern
    such as `"gla,gla,gla,dense"`, or a ratio `"3:1"` of `linear_method` to `full_method`.
    `method_options` maps a method name to its options (`{"moba": {"topk": 4}}`);
    `attention` / `linear` hold the layer settings of each kind of mixer."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None  # default: 8/3 * hidden, rounded up to 32
    layers: str = "dense"
    linear_method: str = "gla"
    full_method: str = "dense"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0
    output_gate: bool = False
    attention: dict[str, Any] = field(default_factory=dict)  # extra Attention settings (inputs, bias)
    linear: dict[str, Any] = field(default_factory=dict)  # LinearAttention settings (short_conv, ...)
    tie_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    aux_loss_weight: float = 1.0  # weight of the mixers' auxiliary losses (DSA's indexer loss)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise AttnkitError(f"{name}: expected an int >= 1, got {val!r}")
        if not isinstance(self.method_options, dict) or any(not isinstance(v, dict) for v in self.method_options.values()):
            raise AttnkitError(f"method_options: expected a dict of method name -> dict of options, got {self.method_options!r}")
        self.layer_methods()  # validates the pattern

    def layer_methods(self) -> list[str]:
        return layer_methods(self.layers, self.num_layers, self.linear_method, self.full_method)

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-(8 * self.hidden_size // 3) // 32) * 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=2, sort_keys=True)
        except TypeError as e:
            raise AttnkitError(f"config: not JSON-serialisable ({e}); method options must be plain values") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise AttnkitError(f"config: unknown field {unknown[0]!r}")
        return cls(**d)
