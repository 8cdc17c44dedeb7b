"""nn.Modules built on attnkit's functional ops (docs/layers.md).

- `Attention`: q/k/v/o projections, RoPE, GQA/MQA, output gate, any softmax-family method.
- `LinearAttention`: the linear/recurrent family with short conv and gated output norm.
- `layer_methods` / `make_mixer`: hybrid stacks (a pattern or a ratio of methods over depth).
- `Cache` / `LayerCache`: the plain decoding cache.
"""

from .attention import Attention
from .cache import Cache, LayerCache
from .conv import ShortConvolution
from .hybrid import is_linear, layer_methods, make_mixer
from .linear import LinearAttention
from .norm import RMSNorm
from .rope import RoPE, apply_rope

__all__ = [
    "Attention", "Cache", "LayerCache", "LinearAttention", "RMSNorm", "RoPE", "ShortConvolution", "apply_rope",
    "is_linear", "layer_methods", "make_mixer",
]
