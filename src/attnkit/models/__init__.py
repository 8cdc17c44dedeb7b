"""Reference models built from `attnkit.layers`: a Llama-style decoder LM for every method.

    from attnkit.models import DecoderConfig, DecoderLM
    model = DecoderLM(DecoderConfig(layers="gla,gla,gla,dense", num_layers=4))
"""

from .config import DecoderConfig
from .decoder import Block, DecoderLM, SwiGLU
from .generation import generate

__all__ = ["Block", "DecoderConfig", "DecoderLM", "SwiGLU", "generate"]
