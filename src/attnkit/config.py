"""Every setting that changes what attnkit runs, in one place.

The `ATTNKIT_*` environment variables are read once, when attnkit is imported; `docs/flags.md`
lists them. Code reads `config.get().<field>`; tests and experiments change a setting for a block
with `config.override(...)` instead of rewriting module globals or the environment:

    with attnkit.config.override(sparse_keymajor=False):
        ...

`TRITON_INTERPRET` is Triton's own switch, not attnkit's: Triton reads it when kernels are
decorated and launched, and attnkit sets it around interpreter launches (`kernels.launch_env`),
so `triton_interpret()` reads its current value rather than a snapshot.

This module imports nothing of attnkit: every layer may read it.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    val = env.get(name)
    if val is None or val.strip() == "":
        return default
    return val.strip() not in ("0", "false", "False", "no", "off")


def _int(env: Mapping[str, str], name: str, default: Optional[int]) -> Optional[int]:
    val = env.get(name)
    if val is None or val.strip() == "":
        return default
    try:
        return max(1, int(val))
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {val!r}") from None


@dataclass(frozen=True)
class Settings:
    """The settings; each field's comment names its environment variable (see docs/flags.md)."""

    # kernels
    sparse_keymajor: bool = True  # ATTNKIT_SPARSE_KEYMAJOR=0: no key-major sparse kernel
    autotune: bool = True  # ATTNKIT_NO_AUTOTUNE=1: first tile candidate, no timing
    decode_block_n: int = 64  # ATTNKIT_DECODE_BLOCK_N: keys per tile of the decode kernel
    decode_splits: Optional[int] = None  # ATTNKIT_DECODE_SPLITS: split-K programs per row (None: chosen)
    # key-major kernels: "sorted" (keymajor.py), "windowed" (keymajor_windowed.py), "onepass" (keymajor_onepass.py)
    sparse_keymajor_variant: str = "sorted"
    # experimental variants (see `variants()` and attnkit.explain)
    linear_compile: str = ""  # ATTNKIT_LINEAR_COMPILE: "1" inductor, or a torch.compile backend name
    # where the fast paths may run ("cpu" is added by tests to run them in Triton's interpreter)
    routed_topk_devices: tuple[str, ...] = ("cuda",)  # MoBA's and NSA's fused score + top-k kernels
    radix_topk_devices: tuple[str, ...] = ()  # DSA's radix select: measured slower than torch.topk
    dsa_indexer_devices: tuple[str, ...] = ("cuda",)
    quest_kernel_devices: tuple[str, ...] = ("cuda",)  # Quest's page-bound kernel
    quest_radix_devices: tuple[str, ...] = ("cuda",)  # Quest's top pages by radix select (else a stable sort)
    dsa_fused_topk_devices: tuple[str, ...] = ()  # DSA's indexer fused with its top-k: not yet measured
    half_gemm_devices: tuple[str, ...] = ("cuda",)  # selection GEMMs keep half operands
    linear_compile_devices: tuple[str, ...] = ("cuda",)
    # files
    cache_dir: Optional[str] = None  # ATTNKIT_CACHE_DIR: the benchmark's capture cache


def from_env(env: Optional[Mapping[str, str]] = None) -> Settings:
    """Settings from environment variables (`os.environ` by default)."""
    env = os.environ if env is None else env
    return Settings(
        sparse_keymajor=_flag(env, "ATTNKIT_SPARSE_KEYMAJOR", True),
        autotune=not _flag(env, "ATTNKIT_NO_AUTOTUNE", False),
        decode_block_n=_int(env, "ATTNKIT_DECODE_BLOCK_N", 64) or 64,
        decode_splits=_int(env, "ATTNKIT_DECODE_SPLITS", None),
        linear_compile=(env.get("ATTNKIT_LINEAR_COMPILE") or "").strip(),
        cache_dir=env.get("ATTNKIT_CACHE_DIR") or None,
    )


def default_cache_dir() -> str:
    """Where cached files go without `ATTNKIT_CACHE_DIR`: `$XDG_CACHE_HOME/attnkit`, else `~/.cache/attnkit`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "attnkit")


_current = from_env()


def get() -> Settings:
    """The settings in force."""
    return _current


@contextmanager
def override(**changes: Any) -> Iterator[Settings]:
    """Change settings for the duration of a `with` block (names: the fields of `Settings`)."""
    global _current
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"{unknown[0]}: not an attnkit setting (settings: {', '.join(sorted(names))})")
    old = _current
    _current = dataclasses.replace(old, **changes)
    try:
        yield _current
    finally:
        _current = old


def hub_offline() -> None:
    """Keep the Hugging Face libraries from reaching the network (a user's own setting wins): the
    packaged models load from local files, and a stray hub lookup would only slow or break a run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def triton_interpret() -> bool:
    """Whether `TRITON_INTERPRET=1` is set now (Triton's switch for its CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextmanager
def triton_interpret_set() -> Iterator[None]:
    """`TRITON_INTERPRET=1` for the duration of a `with` block, then as it was: Triton reads it when
    a kernel is decorated and again when it launches, and no other code should see it."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
