"""Method specs: what each mechanism is, what it selects, and which backends can run it.

A mechanism is data: its options, its capabilities, its selection (`select(call, opts) ->
KVSelection`, one signature for every method) or its static pattern (`mask(opts) -> Mask`), the
maker of its learned inputs (gates, indexer projections) and its backends in preference order. The
benchmark, the KV readers, the layers and the tests read the spec; nothing finds a selection by
module name. Backends and the choice between them live in `ops.dispatch` (one dispatcher).

Registration: `register_selection(name, options, select)` (or `mask=` for a static pattern) for
every mechanism that is a selection run by the shared executors, a user's included;
`register(spec)` for a spec written out in full (dense attention, the linear family).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .core.contract import AttentionCall, AttnkitError, BackendError, OptionError, plain_scalar, validate_attention
from .core.masks import Mask
from .core.selection import KVSelection
from .ops.dispatch import Backend, Check, Explanation, Runner, choose
from .ops.executors import mask_backends, selection_backends

SelectFn = Callable[[AttentionCall, Any], KVSelection]
MaskFn = Callable[[Any], Mask]


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
        return cls(**{name: plain_scalar(value) for name, value in options.items()})  # type: ignore[call-arg]

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
    # the selection is estimated from the whole prompt (e.g. from the last queries' attention), so a
    # later key may change which earlier keys a row attends; it never lets a row attend a key the
    # causal rule hides from it. The fuzz suite then holds earlier rows to attention under the
    # selection actually used, instead of to bitwise equality.
    selection_reads_whole_prompt: bool = False
    # a decode step (Tq == 1) attends to every visible key: the selection is estimated from the
    # prompt's own queries, which a decode step does not have (the sparse-prefill estimators)
    decode_dense: bool = False


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
    # the selection of a validated call (no gradients), one signature for every method; None when the
    # method's visibility is not a selection (dense, static patterns, the linear family)
    select: Optional[SelectFn] = None
    # a static pattern's mask predicate from the parsed options
    mask: Optional[MaskFn] = None
    # the nn.Module class that makes per-token tensor options from activations (NSA's gates, DSA's
    # indexer inputs); see `layers.method_inputs` for its interface
    inputs: Optional[type] = None
    # named variants of the method's own paths for a call, `[(name, on, why)]` (an experimental
    # kernel, a device-dependent one); `attnkit.explain` lists them
    variants: Optional[Callable[[AttentionCall, Any], list[tuple[str, bool, str]]]] = None
    # a method on its own backends (not the shared executors): its exact visibility for a validated
    # call as a mask predicate (None: every key the causal rule allows), what the test oracle reads
    visibility: Optional[Callable[[AttentionCall, Any], Optional[Mask]]] = None
    # "selection" or "mask" when the method runs on the shared executors (its attention is exactly the
    # executor over `select`/`mask`, which the shared test suites check); "" for its own backends
    executor: str = ""

    def selection(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: Optional[float] = None,
                  cu_seqlens: Optional[torch.Tensor] = None, **options: Any) -> KVSelection:
        """The method's selection for `q: [B, Tq, Hq, D]`, `k: [B, Tk, Hkv, D]` (no executor): inputs and
        options validated as `attnkit.attention` validates them, then `select(call, opts)`."""
        if self.select is None:
            raise AttnkitError(f"method: {self.name!r} has no selection (select(call, opts))")
        call = validate_attention(q, k, k, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
        return self.select(call, parse_options(self, call, options))

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise AttnkitError(
            f"backend: expected one of {['auto'] + [b.name for b in self.backends]} for method {self.name!r}, got {name!r}"
        )


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a fully written spec to the registry (names are unique)."""
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise OptionError(f"name: expected a Python identifier, got {spec.name!r}")
    if spec.name in _REGISTRY:
        raise OptionError(f"name: method {spec.name!r} is already registered")
    if not (isinstance(spec.options, type) and dataclasses.is_dataclass(spec.options)
            and issubclass(spec.options, MethodOptions)):
        raise TypeError(f"options: {spec.name}: options must be a MethodOptions dataclass, got {spec.options!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> MethodSpec:
    """Remove a registered method (a user's experiment, a test's temporary method); returns its spec."""
    return _REGISTRY.pop(get_method(name).name)


def register_selection(
    name: str,
    options: type,
    select: Optional[SelectFn] = None,
    *,
    mask: Optional[MaskFn] = None,
    family: Optional[str] = None,
    paper: str = "",
    summary: str = "",
    example: Optional[Callable[[AttentionCall], dict[str, Any]]] = None,
    capabilities: Capabilities = Capabilities(),
    tier: int = 1,
    flex_block: Optional[Callable[[Any], Optional[int]]] = None,
    inputs: Optional[type] = None,
    backends: Optional[tuple[Backend, ...]] = None,
    docs: Optional[str] = None,
    variants: Optional[Callable[[AttentionCall, Any], list[tuple[str, bool, str]]]] = None,
) -> MethodSpec:
    """Register a mechanism whose visibility is a selection (or a static mask) run by the shared executors.

    - `options`: a `MethodOptions` dataclass; its `__post_init__` range-checks the fields.
    - `select(call, opts) -> KVSelection`: the keys each query may see, for a validated
      `AttentionCall` (`call.q: [B, Tq, Hq, D]`, `call.k: [B, Tk, Hkv, D]`, `call.causal`,
      `call.cu_seqlens`) and the parsed options; runs without gradients. Backends: `triton` (CUDA),
      `flex` (block-level selections whose `flex_block(opts)` is a multiple of 128), `reference`.
    - `mask=mask(opts) -> core.masks.Mask` instead of `select`: a static pattern (family "static"),
      run by FlexAttention on CUDA and the reference everywhere.
    - `example(call) -> options`: valid options for given inputs (the benchmark's defaults, the
      shared tests); `{}` when every option has a default.
    - `backends`: a method that runs its selection inside a larger computation (NSA's gated
      branches) passes its own; `select` is still what the benchmark and the KV readers use.

    The method then runs through `attnkit.attention`, `attnkit.explain`, `attnkit bench` and the
    decode reader `kv.Routed(method=name)`."""
    if (select is None) == (mask is None):
        raise OptionError(f"select: method {name!r} needs exactly one of select=(call, opts) -> KVSelection "
                          "or mask=(opts) -> Mask")
    if select is not None and not callable(select):
        raise OptionError(f"select: expected a callable (call, opts) -> KVSelection, got {type(select).__name__}")
    if mask is not None and not callable(mask):
        raise OptionError(f"mask: expected a callable (opts) -> Mask, got {type(mask).__name__}")
    executor = ""
    if backends is None:
        backends = selection_backends(select, flex_block) if select is not None else mask_backends(mask)
        executor = "selection" if select is not None else "mask"
    return register(
        MethodSpec(
            name=name,
            family=family or ("static" if mask is not None else "sparse"),
            paper=paper,
            summary=summary,
            options=options,
            capabilities=capabilities,
            backends=backends,
            docs=f"docs/methods/{name}.md" if docs is None else docs,
            tier=tier,
            example=example or (lambda call: {}),
            select=select,
            mask=mask,
            inputs=inputs,
            variants=variants,
            executor=executor,
        )
    )


def get_method(name: object) -> MethodSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise AttnkitError(f"method: expected one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def methods() -> list[MethodSpec]:
    return list(_REGISTRY.values())


def choose_backend(spec: MethodSpec, call: AttentionCall, opts: Any, requested: str = "auto") -> Explanation:
    """Pick the backend for a call (`ops.dispatch.choose`); the Explanation lists every candidate's verdict."""
    if requested != "auto":
        spec.backend(requested)  # raises for unknown names
    exp = choose(spec.name, spec.backends, call, opts, requested)
    if spec.variants is not None:
        exp.variants = list(spec.variants(call, opts))
    return exp


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
