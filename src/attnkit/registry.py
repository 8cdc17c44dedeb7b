"""Method specs: what each mechanism is, what it supports, and which backends can run it.

In the spirit of xformers' operator metadata: support is declared as data, and dispatch can say,
backend by backend, why one was chosen and the others were not (`attnkit.explain`).

A method registers a `MethodSpec` with `register(spec)`. Its backends are listed in preference
order (fastest first, as measured by the benchmark); `backend="auto"` takes the first one whose
checks all pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .core.contract import SUPPORTED_DTYPES, AttentionCall, AttnkitError, BackendError, OptionError

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class MethodOptions:
    """Base for a method's options dataclass.

    Subclasses are dataclasses whose `__post_init__` range-checks each field (raising
    `OptionError` naming it); `check_call` validates options that depend on the inputs
    (per-head lists, gate shapes).
    """

    @classmethod
    def parse(cls, method: str, options: dict[str, Any]) -> "MethodOptions":
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(options) - set(names))
        if unknown:
            valid = ", ".join(names) if names else "none"
            raise OptionError(f"{unknown[0]}: not an option of method {method!r} (its options: {valid})")
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in options and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise OptionError(f"{missing[0]}: required option of method {method!r} is missing")
        return cls(**options)  # type: ignore[call-arg]

    def check_call(self, call: AttentionCall) -> None:
        """Validate options against the inputs; raise OptionError naming the option."""

    def describe(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            val = getattr(self, f.name)
            out[f.name] = f"Tensor{tuple(val.shape)}" if isinstance(val, torch.Tensor) else val
        return out


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """For methods without options."""


@dataclass(frozen=True)
class Capabilities:
    """What a method supports, on at least one backend."""

    causal: bool = True
    non_causal: bool = True
    gqa: bool = True
    varlen: bool = True
    backward: bool = True
    decode: bool = True  # Tq != Tk, in particular Tq = 1 against a long key sequence
    lse: bool = True


Runner = Callable[[AttentionCall, Any], Any]
Check = Callable[[AttentionCall, Any], Optional[str]]


@dataclass(frozen=True)
class Backend:
    """One way to run a method. `supports` returns None, or the reason it cannot serve a call."""

    name: str
    run: Runner
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES
    lse: bool = True
    varlen: bool = True
    backward: bool = True
    available: Optional[Callable[[], Optional[str]]] = None
    supports: Optional[Check] = None

    def why_not(self, call: AttentionCall, opts: Any) -> Optional[str]:
        if self.available is not None:
            reason = self.available()
            if reason:
                return reason
        if call.device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, inputs are on {call.device.type}"
        if call.dtype not in self.dtypes:
            have = ", ".join(_DTYPE_NAMES[d] for d in self.dtypes)
            return f"dtype {_DTYPE_NAMES.get(call.dtype, call.dtype)} not supported (supports {have})"
        if call.return_lse and not self.lse:
            return "cannot return the LSE (return_lse=True)"
        if call.varlen and not self.varlen:
            return "no varlen (cu_seqlens) support"
        if call.requires_grad and torch.is_grad_enabled() and not self.backward:
            return "forward only, and inputs require grad"
        if self.supports is not None:
            return self.supports(call, opts)
        return None


@dataclass(frozen=True)
class MethodSpec:
    """A mechanism: its paper, options, capabilities and backends (preference order)."""

    name: str
    family: str  # "exact", "static", "sparse", "prefill", "linear", ...
    paper: str
    summary: str
    options: type
    capabilities: Capabilities
    backends: tuple[Backend, ...]
    docs: str = ""
    tier: int = 1
    # valid options for given inputs, used by the benchmark, the CLI smoke run and the tests that
    # exercise every method (tensor-valued options such as gates are made here)
    example: Callable[[AttentionCall], dict[str, Any]] = lambda call: {}

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise AttnkitError(
            f"backend: expected one of {['auto'] + [b.name for b in self.backends]} for method {self.name!r}, got {name!r}"
        )


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    if not dataclasses.is_dataclass(spec.options) or not issubclass(spec.options, MethodOptions):
        raise TypeError(f"{spec.name}: options must be a MethodOptions dataclass")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: object) -> MethodSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise AttnkitError(f"method: expected one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def methods() -> list[MethodSpec]:
    return list(_REGISTRY.values())


def check_capabilities(spec: MethodSpec, call: AttentionCall) -> None:
    """Errors for calls the method cannot serve on any backend (not a dispatch question)."""
    caps = spec.capabilities
    if call.causal and not caps.causal:
        raise AttnkitError(f"causal: method {spec.name!r} is non-causal only, got causal=True")
    if not call.causal and not caps.non_causal:
        raise AttnkitError(f"causal: method {spec.name!r} is causal only, got causal=False")
    if call.hq != call.hkv and not caps.gqa:
        raise AttnkitError(f"k: method {spec.name!r} needs Hkv == Hq (no GQA), got Hq={call.hq}, Hkv={call.hkv}")
    if call.varlen and not caps.varlen:
        raise AttnkitError(f"cu_seqlens: method {spec.name!r} has no varlen support")
    if call.return_lse and not caps.lse:
        raise AttnkitError(f"return_lse: method {spec.name!r} has no softmax LSE to return")
    if call.tq != call.tk and not caps.decode:
        raise AttnkitError(f"q: method {spec.name!r} needs Tq == Tk, got Tq={call.tq}, Tk={call.tk}")


@dataclass
class Explanation:
    """Why each backend was or was not chosen for one call."""

    method: str
    requested: str
    chosen: Optional[str]
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"method {self.method!r}, backend={self.requested!r}: chosen {self.chosen!r}"]
        for name, ok, reason in self.rows:
            mark = "->" if name == self.chosen else ("ok" if ok else "no")
            lines.append(f"  {mark} {name:<10} {reason}")
        return "\n".join(lines)

    __repr__ = __str__


def choose_backend(spec: MethodSpec, call: AttentionCall, opts: Any, requested: str = "auto") -> Explanation:
    """Pick the backend for a call; the returned Explanation lists every candidate's verdict."""
    if requested != "auto":
        spec.backend(requested)  # raises for unknown names
    exp = Explanation(spec.name, requested, None)
    backends, measured_why = list(spec.backends), None
    if requested == "auto" and len(backends) > 2:  # several executors: the GPU measurement may reorder them
        from .ops.dispatch import measured_order

        measured = measured_order(spec.name, call)
        if measured is not None:
            rank = {name: i for i, name in enumerate(measured[0])}
            backends.sort(key=lambda b: rank.get(b.name, len(rank)))  # stable: unmeasured ones keep their order
            measured_why = measured[1]
    for b in backends:
        reason = b.why_not(call, opts)
        ok = reason is None
        if ok and exp.chosen is None and requested in ("auto", b.name):
            exp.chosen = b.name
            if requested != "auto":
                text = "chosen: requested"
            elif measured_why is not None and b.name in measured[0]:
                text = "chosen: " + measured_why
            else:
                text = "chosen: first supported backend in preference order"
        elif ok:
            text = "supported, not chosen" + (" (another backend was requested)" if requested != "auto" else " (lower preference)")
        else:
            text = reason
        exp.rows.append((b.name, ok, text))
    return exp


def list_methods() -> list[dict[str, Any]]:
    """One row per registered method: name, family, paper, options, capabilities, backends."""
    rows = []
    for spec in _REGISTRY.values():
        caps = dataclasses.asdict(spec.capabilities)
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "tier": spec.tier,
                "paper": spec.paper,
                "summary": spec.summary,
                "options": [f.name for f in dataclasses.fields(spec.options)],
                "capabilities": caps,
                "backends": [b.name for b in spec.backends],
                "docs": spec.docs,
            }
        )
    return rows


def markdown_table() -> str:
    """The README's capability table (a test keeps the two equal)."""
    cols = ["causal", "non_causal", "gqa", "varlen", "backward", "decode", "lse"]
    head = ["method", "family", "paper", "options"] + [c.replace("_", "-") for c in cols] + ["backends"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in list_methods():
        opts = ", ".join(f"`{o}`" for o in r["options"]) or "-"
        name = f"[`{r['name']}`]({r['docs']})" if r["docs"] else f"`{r['name']}`"
        marks = ["yes" if r["capabilities"][c] else "-" for c in cols]
        lines.append("| " + " | ".join([name, r["family"], r["paper"], opts] + marks + [", ".join(r["backends"])]) + " |")
    return "\n".join(lines)


def parse_options(spec: MethodSpec, call: AttentionCall, options: dict[str, Any]) -> MethodOptions:
    opts = spec.options.parse(spec.name, options)
    opts.check_call(call)
    return opts


def ensure_backend(exp: Explanation) -> str:
    if exp.chosen is None:
        raise BackendError(f"no backend can run this call.\n{exp}")
    return exp.chosen
