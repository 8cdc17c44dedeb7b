"""Argument checks shared by every layer of the library; each error names the argument, the
expected and the actual value (docs/design.md "The contract")."""

from __future__ import annotations

import torch

from .contract import AttentionCall, OptionError


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise OptionError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_tensor_type(name: str, value: object, optional: bool = False) -> None:
    """A floating-point tensor (or None when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        want = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise OptionError(f"{name}: expected {want}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise OptionError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")


def check_tensor_shape(name: str, value: torch.Tensor, shape: tuple[int, ...], layout: str, call: AttentionCall) -> None:
    """A tensor option of the given shape (`layout` names its dims) on the call's device."""
    if tuple(value.shape) != tuple(shape):
        raise OptionError(f"{name}: expected shape {layout} = {tuple(shape)}, got {tuple(value.shape)}")
    if value.device != call.device:
        raise OptionError(f"{name}: expected device {call.device} (same as q), got {value.device}")
