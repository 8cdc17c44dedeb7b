"""The configurations an accuracy run compares, and the two profiles.

A configuration is one way of running the model: `dense` (transformers' own SDPA and cache, the
reference), a sparse *prefill* method through `attnkit.hf.use` (every attention call of the model,
prompt and decoding, runs the method), or a *KV* policy or reader through
`attnkit.integrations.hf_kv.kv_policy` (the context is prefilled densely, then compressed; the
question and the answer are decoded against the compressed cache or read sparsely).

Each budgeted configuration is written `name@budget` with `budget` in (0, 1], the fraction of the
prompt each query may read (prefill methods), each KV head keeps (eviction policies) or each
decode query reads (readers); the options are derived from it and from the prompt length, and the
measured density, kept bytes and reads are reported next to the score. Four prefill methods have
no budget (UNBUDGETED): `power` (its pattern is fixed by the block size) and the methods that keep
a share of the estimated attention mass rather than a share of the keys (`xattention`,
`flexprefill`, `token_sparse`), which run at their papers' default thresholds.

Groups (`GROUPS`) name several configurations at once: `prefill`, `estimated` (the training-free
methods that estimate their pattern from the prompt's attention), `kv-eviction`, `kv-reader`.

Not applicable on a pretrained model: methods whose selection needs trained projections or gates
(`nsa`, `dsa`: untrained indexer / gates), `dilated` and `strided` (patterns that drop the local
window the model was trained with), and the linear family (a different model). They are listed
in the report, not run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ...core.contract import OptionError

BUDGETS = (0.125, 0.25, 0.5)
BLOCK = 64  # key block of the block-sparse prefill methods
PAGE = 16  # the KV cache's page size (Quest reads pages)

# the training-free prefill methods that estimate their pattern from the prompt's own attention
ESTIMATED = ("vertical_slash", "xattention", "flexprefill", "token_sparse", "hip")
PREFILL_METHODS = ("sliding_window", "block_topk", "moba", "stochastic", "power", *ESTIMATED)
KV_POLICIES = ("streaming", "h2o", "snapkv", "razor")
KV_READERS = ("quest", "recycled", "santa")
# prefill methods without a budget: a fixed pattern (power) or a share of the estimated attention
# mass (the papers' default thresholds), whose density follows from the content
UNBUDGETED = {
    "power": {"block_size": BLOCK, "sinks": 1},
    "xattention": {"block_size": 128, "stride": 8, "threshold": 0.9},
    "flexprefill": {"block_size": 128, "gamma": 0.9, "tau": 0.1},
    "token_sparse": {"coverage": 0.9, "n_last": 64, "sinks": 4, "window": 64},
}
# MInference's default split of its key budget between columns and diagonals (1000 : 6096)
VERTICAL_SHARE = 1000 / 7096
NOT_APPLICABLE = {
    "nsa": "needs trained gates for its three branches",
    "dsa": "needs a trained lightning indexer (q_idx, k_idx, w)",
    "dilated": "drops the local window a pretrained model relies on",
    "strided": "drops the local window a pretrained model relies on",
    "linear family": "a different model (recurrent state instead of softmax attention)",
}


@dataclass(frozen=True)
class Config:
    """`kind`: "dense", "prefill" or "kv"; `name`: method or policy; `budget`: None or (0, 1]."""

    kind: str
    name: str
    budget: Optional[float] = None

    @property
    def label(self) -> str:
        return self.name if self.budget is None else f"{self.name}@{self.budget:g}"

    @property
    def family(self) -> str:
        if self.kind == "dense":
            return "exact"
        if self.kind == "prefill":
            return "prefill"
        return "kv-reader" if self.name in KV_READERS else "kv-eviction"

    def options(self, length: int) -> dict[str, Any]:
        """The method's or policy's options for a prompt of `length` tokens."""
        b = self.budget
        if self.kind == "dense":
            return {}
        if self.name in UNBUDGETED:
            return dict(UNBUDGETED[self.name])
        assert b is not None
        keys = max(1, math.ceil(b * length))
        blocks = max(1, math.ceil(keys / BLOCK))
        if self.name == "vertical_slash":  # keys per query: columns + diagonals, split as MInference's default
            n_vertical = max(1, round(keys * VERTICAL_SHARE))
            n_slash = max(1, keys - n_vertical)
            return {"n_vertical": n_vertical, "n_slash": n_slash, "n_last": 64, "block_size": BLOCK,
                    "sinks": min(30, n_vertical), "window": min(100, n_slash)}
        return {
            "hip": {"block_size": BLOCK, "topk": blocks, "sinks": 1, "local": 1},
            "sliding_window": {"window": keys, "sinks": 4},
            "block_topk": {"block_size": BLOCK, "topk": blocks},
            "moba": {"block_size": BLOCK, "topk": blocks},
            # a window of w in the permuted order lists 2w - 1 keys, about half of them causally visible
            "stochastic": {"window": keys},
            "streaming": {"budget": b, "sinks": 4},
            "h2o": {"budget": b},
            "snapkv": {"budget": b, "obs_window": 32},
            "razor": {"budget": b, "sinks": 4},
            "quest": {"topk": max(1, math.ceil(b * length / PAGE))},
            "recycled": {"stride": 4, "topk": keys},
            "santa": {"samples": keys},
        }[self.name]


GROUPS = {
    "prefill": PREFILL_METHODS,
    "estimated": ESTIMATED,
    "kv-eviction": KV_POLICIES,
    "kv-reader": KV_READERS,
}


def parse_config(text: str) -> list[Config]:
    """`dense`, `NAME@BUDGET`, `NAME` (every budget of BUDGETS; an unbudgeted method once) or a
    group of GROUPS, with or without `@BUDGET` (the budget applies to its budgeted members)."""
    name, at, budget = text.strip().partition("@")
    if name in GROUPS:
        out: list[Config] = []
        for member in GROUPS[name]:
            out += parse_config(member if member in UNBUDGETED else member + at + budget)
        return out
    if name == "dense":
        if at:
            raise OptionError(f"configs: 'dense' takes no budget, got {text!r}")
        return [Config("dense", "dense")]
    if name in UNBUDGETED:
        if at:
            raise OptionError(f"configs: {name!r} takes no budget (it runs with {UNBUDGETED[name]}), got {text!r}")
        return [Config("prefill", name)]
    if name in PREFILL_METHODS:
        kind = "prefill"
    elif name in KV_POLICIES or name in KV_READERS:
        kind = "kv"
    elif name in NOT_APPLICABLE:
        raise OptionError(f"configs: {name!r} is not applicable on a pretrained model ({NOT_APPLICABLE[name]})")
    else:
        known = ["dense", *PREFILL_METHODS, *KV_POLICIES, *KV_READERS]
        raise OptionError(f"configs: expected names from {known} or groups {sorted(GROUPS)} (optionally "
                          f"NAME@BUDGET), got {text!r}")
    if not budget:
        return [Config(kind, name, b) for b in BUDGETS]
    try:
        b = float(budget)
    except ValueError:
        raise OptionError(f"configs: expected a budget in (0, 1] after '@', got {text!r}") from None
    if not 0 < b <= 1:
        raise OptionError(f"configs: expected a budget in (0, 1] after '@', got {text!r}")
    return [Config(kind, name, b)]


def parse_configs(items: list[str]) -> list[Config]:
    out: list[Config] = [Config("dense", "dense")]  # the reference always runs first
    for item in items:
        for c in parse_config(item):
            if c not in out:
                out.append(c)
    return out


@dataclass(frozen=True)
class Profile:
    lengths: tuple[int, ...]
    samples: int  # samples per task and length (rounds; sample i of single_needle sits at DEPTHS[i % 5])
    configs: tuple[str, ...]
    device: str
    dtype: str
    max_minutes: Optional[float]


PROFILES = {
    # a 2-core CPU in under 10 minutes: two lengths, one sample per task, a budget of 25 % per family
    "quick": Profile((1024, 2048), 1, ("sliding_window@0.25", "block_topk@0.25", "streaming@0.25", "snapkv@0.25",
                                       "quest@0.25"), "cpu", "fp32", None),
    # one GPU in one 8-minute call: every applicable prefill method and tier-1 KV policy and reader at
    # 12.5 / 25 / 50 %, the estimated-pattern prefill methods at 12.5 / 25 % (budgeted) or their papers'
    # thresholds, lengths 1K-8K (36 configurations, 720 prompts a round); rounds of one sample per task,
    # as many as fit the time limit
    "full": Profile((1024, 2048, 4096, 8192), 4, ("sliding_window", "block_topk", "moba", "stochastic", "power",
                                                  "streaming", "h2o", "snapkv", "razor", "quest",
                                                  "vertical_slash@0.125", "vertical_slash@0.25", "hip@0.125",
                                                  "hip@0.25", "xattention", "flexprefill", "token_sparse"),
                    "cuda", "bf16", 6.5),
}


def replace(profile: Profile, **changes: Any) -> Profile:
    return dataclasses.replace(profile, **{k: v for k, v in changes.items() if v is not None})
