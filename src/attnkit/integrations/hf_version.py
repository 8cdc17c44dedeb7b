"""The transformers versions the Hugging Face integration supports, checked at import.

The integration plugs into transformers' `AttentionInterface`, `AttentionMaskInterface` (whose
builders receive `q_length`, `q_offset`, `kv_offset` from transformers 5.4 on) and the `Cache` /
`CacheLayerMixin` classes. Older versions call the mask builder with other arguments (4.57 and
5.0-5.3 fail with `mask_interface() missing ... 'q_length'`), so they are refused at import with a
message instead of failing inside `generate`. The floor was found by running
tests/integrations against 5.0.0, 5.2.0, 5.3.0 (fail) and 5.4.0, 5.5.4, 5.10.4 (pass).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MIN_TRANSFORMERS = (5, 4)


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
