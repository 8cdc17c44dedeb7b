"""Whether each kind of backend can run in this environment, in one place: Triton, FlexAttention,
flash-linear-attention (fla), cuDNN attention. Each check returns None, or why not.

A `Backend` names the kinds it needs in `requires`, and the dispatcher asks here; kernels and
executors ask here before importing an optional package. None of these imports the package it
checks (Triton and fla are found by name), so `import attnkit` stays cheap. The answers are kept
for the process: a search of `sys.path` costs tens of microseconds, and the dispatcher asks on
every call.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional

import torch


@functools.lru_cache(maxsize=1)
def triton() -> Optional[str]:
    """None when Triton can be imported, else the reason."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    return None


@functools.lru_cache(maxsize=1)
def flex() -> Optional[str]:
    """None when this torch build has FlexAttention, else the reason."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the torch build
        return f"torch.nn.attention.flex_attention unavailable ({exc})"
    return None


@functools.lru_cache(maxsize=1)
def fla() -> Optional[str]:
    """None when flash-linear-attention is importable, else the reason."""
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention not installed (pip install flash-linear-attention)"
    return None


def cudnn() -> Optional[str]:
    """None when PyTorch's cuDNN attention can be asked for (cuDNN >= 9), else the reason."""
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if version is None or version < 90000:
        return f"cudnn attention needs cuDNN >= 9, found {version}"
    return None


CHECKS: dict[str, Callable[[], Optional[str]]] = {"triton": triton, "flex": flex, "fla": fla, "cudnn": cudnn}


def missing(kind: str) -> Optional[str]:
    """Why backends of `kind` (a key of `CHECKS`) cannot run here, or None."""
    return CHECKS[kind]()
