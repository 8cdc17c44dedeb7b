"""Shared plumbing for static-pattern methods: a mask predicate run by the masked executor."""

from __future__ import annotations

from typing import Any, Callable

from ..core.contract import AttentionCall, OptionError
from ..core.masks import Mask
from ..ops.executors import mask_backends
from ..registry import Capabilities, MethodSpec, register


def check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name}: expected an int >= {minimum}, got {value!r}")


def register_static(
    name: str,
    paper: str,
    summary: str,
    options: type,
    make_mask: Callable[[Any], Mask],
    example: Callable[[AttentionCall], dict[str, Any]],
    tier: int = 1,
) -> MethodSpec:
    """Register a method whose visibility is a mask predicate built from its options."""

    return register(
        MethodSpec(
            name=name,
            family="static",
            paper=paper,
            summary=summary,
            options=options,
            capabilities=Capabilities(),
            backends=mask_backends(make_mask),
            docs=f"docs/methods/{name}.md",
            tier=tier,
            example=example,
        )
    )
