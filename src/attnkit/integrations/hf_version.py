"""The transformers versions the Hugging Face integration supports, checked at import.

The integration plugs into transformers' `AttentionInterface`, `AttentionMaskInterface` (whose
builders receive `q_length`, `kv_offset`, ...) and the `Cache` / `CacheLayerMixin` classes as they
are in transformers 5; 4.x has other signatures there, so it is refused with a message instead of
failing later inside `generate`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MIN_TRANSFORMERS = (5, 0)


def _parse(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_transformers() -> str:
    """The installed transformers version; ImportError naming the version needed if it is missing or too old."""
    need = ".".join(map(str, MIN_TRANSFORMERS))
    try:
        have = version("transformers")
    except PackageNotFoundError:
        raise ImportError(f"attnkit.hf needs transformers >= {need} (pip install 'attnkit[hf]')") from None
    if _parse(have) < MIN_TRANSFORMERS:
        raise ImportError(f"attnkit.hf needs transformers >= {need}, found {have} "
                          f"(pip install -U 'transformers>={need}')")
    return have
