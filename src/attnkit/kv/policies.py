"""KV eviction policies: a policy *scores* the cached tokens of each KV head, the shared
`compress` keeps the `budget` highest-scored per head (kvpress's scorer idea).

Scores are `[B, Hkv, N]` over the kept tokens of one layer (`PagedLayerCache.kept()`, sorted by
position); `+inf` marks a token that must stay (sinks, recent window, observation window),
padding is ignored. A policy is applied after prefill (`compress`) and, when `evicts_on_decode`
(streaming, h2o), after each appended token (`step`): a count budget holds each head at that
many tokens, a ratio budget at that fraction of the tokens seen so far.

| name | keeps |
|---|---|
| `streaming` | the `sinks` first tokens and the `window` most recent (StreamingLLM) |
| `h2o` | the `window` most recent plus the largest accumulated attention, to `budget` (H2O) |
| `snapkv` | the observation window plus the prompt tokens most attended by it, pooled (SnapKV) |
| `razor` | retrieval heads: everything; others: sinks + window + one compensation token (RazorAttention) |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch

from ..core.checks import check_int
from ..core.contract import OptionError
from .budget import Budget, check_budget, resolve
from .paged import PagedLayerCache
from .scoring import attention_mass, pool1d

INF = float("inf")


@dataclass
class ScoreInputs:
    """What a scorer may look at: the layer's kept tokens and the queries that just attended."""

    layer: int
    cache: PagedLayerCache
    kept: dict[str, torch.Tensor]  # PagedLayerCache.kept(): k [B,Hkv,N,D], pos [B,Hkv,N], slot, valid, ...
    q: Optional[torch.Tensor]  # [B, Tq, Hq, D]: the prompt (compress) or the new queries (step)
    q_pos: Optional[torch.Tensor]  # [B, Tq]
    scale: float


@dataclass
class EvictionPolicy:
    """Base: subclasses set `name`, implement `score`, and may override `targets` / `compress`."""

    name: ClassVar[str] = ""
    evicts_on_decode: ClassVar[bool] = False
    budget: Optional[Budget] = None

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget, optional=True)

    # -- the scorer --------------------------------------------------------------------------
    def score(self, inp: ScoreInputs) -> torch.Tensor:
        """Higher is kept first: `[B, Hkv, N]`."""
        raise NotImplementedError

    def targets(self, inp: ScoreInputs, n: torch.Tensor) -> torch.Tensor:
        """Tokens each head keeps after prefill, given its count `n [B, Hkv]`."""
        if self.budget is None:
            raise OptionError(f"budget: policy {self.name!r} needs a budget")
        return resolve(self.budget, n)

    # -- shared compression ----------------------------------------------------------------------
    def compress(self, inp: ScoreInputs) -> None:
        """After prefill: keep the top `targets` tokens of each head by `score`."""
        n = inp.kept["valid"].sum(-1)
        target = self.targets(inp, n)
        inp.cache.state["target"] = target
        keep_top(inp, self.score(inp), target)

    def step(self, inp: ScoreInputs) -> None:
        """After a token is appended while decoding: evict back to the target count."""
        if not self.evicts_on_decode:
            return
        n = inp.kept["valid"].sum(-1)
        target = inp.cache.state.get("target")
        if isinstance(self.budget, float):  # a ratio keeps that fraction of the tokens seen so far
            target = self.targets(inp, inp.cache.seen.view(-1, 1).expand_as(n))
        elif target is None:
            target = self.targets(inp, n)
        inp.cache.state["target"] = target
        if bool((n > target).any()):
            keep_top(inp, self.score(inp), target)

    def observe(self, inp: ScoreInputs) -> None:
        """After the new queries attended (H2O accumulates their attention). Default: nothing."""


def keep_top(inp: ScoreInputs, score: torch.Tensor, target: torch.Tensor) -> None:
    """Retain, per head, the `target [B, Hkv]` valid tokens with the highest `score [B, Hkv, N]`
    (ties: the more recent first)."""
    valid = inp.kept["valid"]
    N = valid.shape[-1]
    # order by recency first, then a stable sort by score: ties go to the more recent token
    s = torch.where(valid, score.double(), -INF)
    order = torch.argsort(inp.kept["pos"].double(), dim=-1, descending=True, stable=True)
    s_by_recency = s.gather(-1, order)
    top = torch.argsort(s_by_recency, dim=-1, descending=True, stable=True)
    chosen = order.gather(-1, top)  # indices into kept, best first
    rank = torch.arange(N, device=valid.device)
    keep = rank < target.unsqueeze(-1)
    slots = torch.where(keep, inp.kept["slot"].gather(-1, chosen), -1)
    inp.cache.retain(slots)


# --- streaming -------------------------------------------------------------------------------


def _check_sinks_and_window(policy: Any) -> None:
    """`sinks >= 0`, `window >= 1` or None, and exactly one of `budget` and `window`."""
    check_int("sinks", policy.sinks, 0)
    if policy.window is not None:
        check_int("window", policy.window, 1)
    if (policy.window is None) == (policy.budget is None):
        raise OptionError(f"budget: {policy.name} needs exactly one of budget or window, got budget={policy.budget!r}, "
                          f"window={policy.window!r}")


@dataclass
class Streaming(EvictionPolicy):
    """StreamingLLM: keep the `sinks` first tokens and the `window` most recent. Give `window`, or a
    `budget` (count or ratio; `window = budget - sinks`)."""

    name: ClassVar[str] = "streaming"
    evicts_on_decode: ClassVar[bool] = True
    sinks: int = 4
    window: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sinks_and_window(self)
        if isinstance(self.budget, int) and self.budget <= self.sinks:
            raise OptionError(f"budget: expected more than sinks={self.sinks} tokens (room for a window), got {self.budget}")

    def targets(self, inp: ScoreInputs, n: torch.Tensor) -> torch.Tensor:
        if self.window is not None:
            return torch.full_like(n, self.sinks + self.window)
        return super().targets(inp, n)

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        pos = inp.kept["pos"].double()
        return torch.where(inp.kept["pos"] < self.sinks, INF, pos)


# --- h2o ----------------------------------------------------------------------------------------


@dataclass
class H2O(EvictionPolicy):
    """H2O: keep the `window` most recent tokens plus the heavy hitters (largest attention accumulated
    over every query so far, summed over the query heads of the KV group) up to `budget`.
    `window=None` gives half the budget to recency, as the paper's default split."""

    name: ClassVar[str] = "h2o"
    evicts_on_decode: ClassVar[bool] = True
    window: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise OptionError("budget: h2o needs a budget (a token count or a ratio)")
        if self.window is not None:
            check_int("window", self.window, 0)
            if isinstance(self.budget, int) and self.window > self.budget:
                raise OptionError(f"window: expected at most budget={self.budget}, got {self.window}")

    def _window(self, target: torch.Tensor) -> torch.Tensor:
        if self.window is not None:
            return torch.minimum(torch.full_like(target, self.window), target)
        return target // 2

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        pos, valid = inp.kept["pos"], inp.kept["valid"]
        target = inp.cache.state["target"]
        win = self._window(target)  # [B, Hkv]
        # recent = among the `win` largest positions of the head
        rank = torch.where(valid, pos, -1).argsort(-1, descending=True).argsort(-1)
        recent = rank < win.unsqueeze(-1)
        return torch.where(recent, INF, slot_scores(inp).double())

    def compress(self, inp: ScoreInputs) -> None:
        self._accumulate(inp)
        super().compress(inp)

    def observe(self, inp: ScoreInputs) -> None:
        self._accumulate(inp)

    def _accumulate(self, inp: ScoreInputs) -> None:
        mass = attention_mass(inp.q, inp.q_pos, inp.kept["k"], inp.kept["pos"], inp.scale, inp.kept["bias"])
        add_slot_scores(inp, mass)


def slot_scores(inp: ScoreInputs) -> torch.Tensor:
    """The cache's current per-slot scores aligned with `inp.kept`: `[B, Hkv, N]` (0 for padding)."""
    cache = inp.cache
    flat, _ = cache.flat_slots()
    slot = inp.kept["slot"]
    vals = cache.score_pool.view(-1)[flat.gather(1, slot.reshape(cache.rows, -1).clamp_min(0))]
    return torch.where(slot >= 0, vals.view(slot.shape), 0.0)


def add_slot_scores(inp: ScoreInputs, values: torch.Tensor) -> None:
    """Add `values [B, Hkv, N]` (aligned with `inp.kept`) to the cache's per-slot scores."""
    cache = inp.cache
    flat, _ = cache.flat_slots()
    slot = inp.kept["slot"].reshape(cache.rows, -1)
    ok = slot >= 0
    idx = flat.gather(1, slot.clamp_min(0))[ok]
    cache.score_pool.view(-1).index_add_(0, idx, values.reshape(cache.rows, -1)[ok].float())


# --- snapkv ---------------------------------------------------------------------------------------


@dataclass
class SnapKV(EvictionPolicy):
    """SnapKV: the last `obs_window` prompt queries vote for prompt keys (softmax attention, summed
    over the window and over the query heads of the KV group), votes are pooled over `kernel_size`
    neighbouring positions (`pooling` "max" or "avg"), and each KV head keeps its top prefix keys
    plus the observation window, `budget` in all."""

    name: ClassVar[str] = "snapkv"
    obs_window: int = 32
    kernel_size: int = 5
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is None:
            raise OptionError("budget: snapkv needs a budget (a token count or a ratio)")
        check_int("obs_window", self.obs_window, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise OptionError(f"kernel_size: expected an odd int (centred pooling), got {self.kernel_size}")
        if self.pooling not in ("max", "avg"):
            raise OptionError(f"pooling: expected 'max' or 'avg', got {self.pooling!r}")
        if isinstance(self.budget, int) and self.budget < self.obs_window:
            raise OptionError(f"budget: expected at least obs_window={self.obs_window} tokens, got {self.budget}")

    def window_size(self, inp: ScoreInputs) -> int:
        return min(self.obs_window, inp.q.shape[1])

    def targets(self, inp: ScoreInputs, n: torch.Tensor) -> torch.Tensor:
        t = super().targets(inp, n)
        w = self.window_size(inp)
        if bool((t < torch.clamp_max(n, w)).any()):
            raise OptionError(f"budget: {self.budget} keeps {int(t.min())} tokens of a head, fewer than the "
                              f"observation window ({w}); raise the budget or lower obs_window")
        return t

    def votes(self, inp: ScoreInputs) -> torch.Tensor:
        """Pooled votes of the observation window: `[B, Hkv, N]` (before protecting the window)."""
        w = self.window_size(inp)
        mass = attention_mass(inp.q[:, -w:], inp.q_pos[:, -w:], inp.kept["k"], inp.kept["pos"], inp.scale,
                              inp.kept["bias"])
        return pool1d(mass, inp.kept["valid"], self.kernel_size, self.pooling)

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        w = self.window_size(inp)
        first_obs = inp.q_pos[:, -w].view(-1, 1, 1)
        return torch.where(inp.kept["pos"] >= first_obs, INF, self.votes(inp).double())


# --- razor ---------------------------------------------------------------------------------------


@dataclass
class Razor(EvictionPolicy):
    """RazorAttention: retrieval heads keep the full cache; every other KV head keeps the `sinks`
    first tokens, a recent `window`, and one compensation token whose key and value are the means
    of the dropped keys and values and which counts for the `m` tokens it replaces (log-weight
    `log m`). Give `window`, or a `budget` per non-retrieval head (`window = budget - sinks - 1`).

    `retrieval_heads`: `{layer: bool [Hkv]}` or a bool tensor `[L, Hkv]` (from
    `kv.razor_heads.retrieval_heads`); a layer missing from it has no retrieval head.
    """

    name: ClassVar[str] = "razor"
    sinks: int = 4
    window: Optional[int] = None
    retrieval_heads: Union[None, dict, torch.Tensor] = None
    compensation: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_sinks_and_window(self)
        extra = self.sinks + (1 if self.compensation else 0)
        if isinstance(self.budget, int) and self.budget <= extra:
            raise OptionError(f"budget: expected more than sinks + compensation = {extra} tokens, got {self.budget}")

    def heads(self, layer: int, hkv: int, device: torch.device) -> torch.Tensor:
        rh = self.retrieval_heads
        if rh is None:
            return torch.zeros(hkv, dtype=torch.bool, device=device)
        row = rh.get(layer) if isinstance(rh, dict) else (rh[layer] if layer < rh.shape[0] else None)
        if row is None:
            return torch.zeros(hkv, dtype=torch.bool, device=device)
        row = torch.as_tensor(row, device=device)
        if row.dtype != torch.bool:  # a list of head ids
            row = torch.zeros(hkv, dtype=torch.bool, device=device).index_fill_(0, row.long(), True)
        if row.shape != (hkv,):
            raise OptionError(f"retrieval_heads: expected {hkv} flags for layer {layer}, got shape {tuple(row.shape)}")
        return row

    def targets(self, inp: ScoreInputs, n: torch.Tensor) -> torch.Tensor:
        comp = 1 if self.compensation else 0
        if self.window is not None:
            local = torch.full_like(n, self.sinks + self.window)
        else:
            full = super().targets(inp, n)
            local = torch.where(full >= n, n, full - comp)  # the compensation token replaces dropped ones only
            if bool(((local <= self.sinks) & (n > local + comp)).any()):
                raise OptionError(f"budget: {self.budget} leaves no room for a window after sinks={self.sinks} "
                                  f"and the compensation token")
        retr = self.heads(inp.layer, n.shape[1], n.device).view(1, -1)
        return torch.where(retr, n, local)

    def score(self, inp: ScoreInputs) -> torch.Tensor:
        pos = inp.kept["pos"]
        retr = self.heads(inp.layer, pos.shape[1], pos.device).view(1, -1, 1)
        s = torch.where(pos < self.sinks, INF, pos.double())
        return torch.where(retr, INF, s)

    def compress(self, inp: ScoreInputs) -> None:
        n = inp.kept["valid"].sum(-1)
        target = self.targets(inp, n)
        score = torch.where(inp.kept["valid"], self.score(inp), -INF)
        # kept = the `target` best; dropped = the other valid tokens (computed before evicting)
        rank = torch.argsort(score, dim=-1, descending=True, stable=True).argsort(dim=-1)
        dropped = inp.kept["valid"] & (rank >= target.unsqueeze(-1))
        m = dropped.sum(-1)  # [B, Hkv]
        comp = None
        if self.compensation and bool((m > 0).any()):
            w = dropped.unsqueeze(-1)
            cd = torch.float64 if inp.kept["k"].dtype == torch.float64 else torch.float32
            denom = m.clamp_min(1).unsqueeze(-1).to(cd)
            k_mean = (inp.kept["k"].to(cd) * w).sum(2) / denom  # [B, Hkv, D]
            v_mean = (inp.kept["v"].to(cd) * w).sum(2) / denom
            first = torch.where(dropped, inp.kept["pos"], torch.iinfo(torch.int64).max).amin(-1)
            comp = (k_mean, v_mean, first, m)
        keep_top(inp, score, target)
        inp.cache.state["target"] = target
        if comp is not None:
            k_mean, v_mean, first, m = comp
            cache = inp.cache
            rows = m > 0
            bias = torch.log(m.clamp_min(1).double()).unsqueeze(-1)
            cache.append(k_mean.unsqueeze(1).to(cache.dtype), v_mean.unsqueeze(1).to(cache.dtype),
                         positions=torch.where(rows, first, 0).unsqueeze(-1), bias=bias, rows=rows)


POLICIES: dict[str, type] = {p.name: p for p in (Streaming, H2O, SnapKV, Razor)}


def get_policy(policy: Union[str, EvictionPolicy], **options: Any) -> EvictionPolicy:
    """A policy by name with its options (`budget=...`), or a policy instance as is."""
    if isinstance(policy, EvictionPolicy):
        if options:
            raise OptionError(f"{sorted(options)[0]}: options are only accepted with a policy name, got an instance")
        return policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise OptionError(f"policy: expected one of {sorted(POLICIES)} or an EvictionPolicy, got {policy!r}")
    cls = POLICIES[policy]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise OptionError(f"{unknown[0]}: not an option of policy {policy!r} (its options: {sorted(names)})")
    return cls(**options)
