"""kernels: attnkit's Triton kernels, their `torch.library` custom ops and autograd glue.

Nothing here imports Triton at `import attnkit` time (so a CPU-only machine never needs it): `load()` imports the
kernel modules on first use. With `TRITON_INTERPRET=1` set when `load()` first runs, the kernels
are built for Triton's CPU interpreter and accept CPU tensors (CI runs them that way at tiny
shapes); otherwise they need CUDA tensors.

By role: `jit` (helpers shared by the kernels), `sparse` (the sparse executor: planning, the
query-major and key-major kernels, the custom ops), `selection` (kernels of the selections: MoBA's
fused gate + top-k, DSA's indexer, Quest's page bounds), `decode` (paged decode).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Iterator, Optional

from .. import config
from ..core import availability

if TYPE_CHECKING:
    import torch

_STATE: dict[str, object] = {}


def load() -> ModuleType:
    """Import the sparse-attention op module (and Triton) once; return it."""
    mod = _STATE.get("sparse")
    if mod is None:
        reason = availability.triton()
        if reason:
            raise RuntimeError(reason)
        _STATE["interpreted"] = config.triton_interpret()
        mod = importlib.import_module(".sparse", __name__)
        _STATE["sparse"] = mod
    return mod  # type: ignore[return-value]


def load_module(name: str) -> ModuleType:
    """Import another kernel module (`"selection.indexer"`, `"decode"`, ...) built the same way as
    `load()`'s (interpreter or GPU)."""
    load()
    mod = _STATE.get(name)
    if mod is None:
        with launch_env():  # interpreter kernels are decorated under TRITON_INTERPRET=1, as at launch
            mod = importlib.import_module(f".{name}", __name__)
        _STATE[name] = mod
    return mod  # type: ignore[return-value]


def module_for(name: str, device: "torch.device", devices: tuple[str, ...]) -> Optional[ModuleType]:
    """Kernel module `name` when its kernels can run on `device` and the caller allows that device
    type (`devices`: "cuda", plus "cpu" where tests run the interpreter twin), else None."""
    if device.type not in devices or device_ok(device.type) is not None:
        return None
    return load_module(name)


def interpreted() -> bool:
    """Whether the loaded kernels run in Triton's CPU interpreter (False before `load()`)."""
    return bool(_STATE.get("interpreted", False))


@contextmanager
def launch_env() -> Iterator[None]:
    """Kernels built for the CPU interpreter also need `TRITON_INTERPRET=1` while they launch
    (Triton reads it again then); it is set for the launch only, so other code never sees it."""
    if not interpreted():
        yield
        return
    with config.triton_interpret_set():
        yield


def loaded() -> bool:
    return "sparse" in _STATE


def device_ok(device_type: str) -> Optional[str]:
    """None when the Triton kernels can run on tensors of this device type, else the reason."""
    reason = availability.triton()
    if reason:
        return reason
    if device_type == "cuda":
        return "kernels were loaded for the CPU interpreter (TRITON_INTERPRET=1)" if interpreted() else None
    if device_type == "cpu" and (interpreted() or (not loaded() and config.triton_interpret())):
        return None
    return f"needs CUDA tensors (inputs are on {device_type}; TRITON_INTERPRET=1 runs the kernels on the CPU)"
