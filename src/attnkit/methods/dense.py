"""`dense`: exact softmax attention (FlashAttention; "Self-attention Does Not Need O(n^2) Memory")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.contract import AttentionCall
from ..ops.executors import run_reference, run_sdpa, sdpa_why_not
from ..registry import Backend, Capabilities, MethodOptions, MethodSpec, register


@dataclass(frozen=True)
class DenseOptions(MethodOptions):
    """Dense attention has no options."""


def _sdpa_supports(call: AttentionCall, opts: Any) -> Optional[str]:
    return sdpa_why_not(call)


SPEC = register(
    MethodSpec(
        name="dense",
        family="exact",
        paper="FlashAttention; Self-attention Does Not Need O(n^2) Memory",
        summary="exact softmax attention; the baseline every mechanism is measured against",
        options=DenseOptions,
        capabilities=Capabilities(),
        backends=(
            Backend("sdpa", lambda call, opts: run_sdpa(call), lse=False, varlen=False, supports=_sdpa_supports),
            Backend("reference", lambda call, opts: run_reference(call)),
        ),
        docs="docs/methods/dense.md",
    )
)
