"""Budgets: how many tokens a KV head keeps, as a count (`int >= 1`) or a ratio (`0 < float <= 1`)."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ..core.contract import OptionError

Budget = Union[int, float]


def check_budget(budget: object, name: str = "budget", optional: bool = False) -> Optional[Budget]:
    """Validate a budget; raise OptionError naming it (0, negative, ratio above 1, wrong type)."""
    if budget is None and optional:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise OptionError(f"{name}: expected a token count (int >= 1) or a ratio (float in (0, 1]), got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise OptionError(f"{name}: expected a token count >= 1, got {budget}")
        return budget
    if not math.isfinite(budget) or budget <= 0:
        raise OptionError(f"{name}: expected a ratio in (0, 1], got {budget}")
    if budget > 1:
        raise OptionError(f"{name}: a ratio must be at most 1 (keep everything), got {budget}; "
                          f"pass an int for a token count")
    return float(budget)


def resolve(budget: Budget, n: torch.Tensor) -> torch.Tensor:
    """Tokens a head may keep given its current count `n` (int64, any shape): the count itself, or
    `ceil(ratio * n)` (at least 1). May exceed `n` (a budget at least the cache size keeps all)."""
    if isinstance(budget, int):
        return torch.full_like(n, budget)
    return torch.ceil(n.double() * budget).long().clamp_min(1)
