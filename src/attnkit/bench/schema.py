"""The one JSON schema of a benchmark results file, and a validator for it.

`SCHEMA` is a JSON Schema (draft 2020-12) document, so any validator can check a results file;
`validate(doc)` checks the subset of JSON Schema used here without extra dependencies and returns
the list of problems (empty when the file conforms).
"""

from __future__ import annotations

import math
from typing import Any

SCHEMA_VERSION = 3  # 2: rows gained select_ms; 3: time_min_ms / time_max_ms, pass, optional accuracy

_NUM_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

ROW = {
    "type": "object",
    "required": [
        "method", "family", "kind", "backend", "options", "workload", "T", "batch", "heads_q", "heads_kv",
        "head_dim", "dtype", "device", "causal", "pass", "status", "error", "notes", "time_ms", "time_min_ms", "time_max_ms", "select_ms", "repeats", "flops",
        "tflops", "peak_memory_bytes", "memory_measure", "rel_error", "cosine", "lse_error", "recall",
        "recall_min", "density", "needle_hits", "speedup", "fidelity_note", "recall_source",
    ],
    "additionalProperties": False,
    "properties": {
        "method": {"type": "string"},
        "family": {"type": "string"},
        "kind": {"enum": ["method", "baseline"]},
        "backend": _STR_OR_NULL,
        "options": {"type": "object"},
        "workload": {"type": "string"},
        "T": {"type": "integer", "minimum": 1},
        "batch": {"type": "integer", "minimum": 1},
        "heads_q": {"type": "integer", "minimum": 1},
        "heads_kv": {"type": "integer", "minimum": 1},
        "head_dim": {"type": "integer", "minimum": 1},
        "dtype": {"enum": ["fp16", "bf16", "fp32", "fp64"]},
        "device": {"enum": ["cpu", "cuda"]},
        "causal": {"type": "boolean"},
        "pass": {"enum": ["forward", "forward+backward"]},  # what the time covers
        "status": {"enum": ["ok", "error", "skipped"]},
        "error": _STR_OR_NULL,
        "notes": {"type": "array", "items": {"type": "string"}},
        "time_ms": _NUM_OR_NULL,  # median of the timed runs
        "time_min_ms": _NUM_OR_NULL,  # fastest and slowest timed run: the spread says how noisy the machine was
        "time_max_ms": _NUM_OR_NULL,
        "select_ms": _NUM_OR_NULL,  # the method's selection alone; null where it has none (dense, baselines)
        "repeats": {"type": "integer", "minimum": 0},
        "flops": _NUM_OR_NULL,
        "tflops": _NUM_OR_NULL,
        "peak_memory_bytes": _INT_OR_NULL,
        "memory_measure": _STR_OR_NULL,
        "rel_error": _NUM_OR_NULL,
        "cosine": _NUM_OR_NULL,
        "lse_error": _NUM_OR_NULL,
        "recall": _NUM_OR_NULL,
        "recall_min": _NUM_OR_NULL,
        "density": _NUM_OR_NULL,
        "needle_hits": _NUM_OR_NULL,
        "speedup": _NUM_OR_NULL,
        "fidelity_note": _STR_OR_NULL,
        "recall_source": _STR_OR_NULL,
        # optional: task accuracy of the method on a real model (e.g. `attnkit accuracy`), where measured;
        # {"task": str, "metric": str, "value": number, "baseline": number or null, ...}
        "accuracy": {"type": ["object", "null"], "required": ["task", "metric", "value"]},
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "attnkit benchmark results",
    "type": "object",
    "required": ["schema_version", "created", "command", "config", "device", "versions", "git", "workloads", "rows"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "created": {"type": "string"},
        "command": {"type": "string"},
        "config": {"type": "object"},
        "device": {"type": "object", "required": ["type", "name"]},
        "versions": {"type": "object", "required": ["python", "torch", "attnkit"]},
        "git": {"type": "object", "required": ["commit", "dirty"]},
        "workloads": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "status", "description"],
                "properties": {"name": {"type": "string"}, "status": {"enum": ["ok", "skipped"]},
                               "description": {"type": "string"}},
            },
        },
        "rows": {"type": "array", "items": ROW},
    },
}

_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[name])


def _check(value: Any, schema: dict[str, Any], path: str, out: list[str]) -> None:
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: expected one of {schema['enum']}, got {value!r}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            out.append(f"{path}: expected {' or '.join(names)}, got {type(value).__name__} {value!r:.60}")
            return
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        out.append(f"{path}: expected >= {schema['minimum']}, got {value}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            for key in value:
                if key not in props:
                    out.append(f"{path}: unexpected key {key!r}")
        for key, sub in props.items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}", out)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]", out)


def validate(doc: Any) -> list[str]:
    """Problems of `doc` against `SCHEMA` (empty list: valid). Non-finite numbers are problems:
    JSON has no NaN or infinity, so unknown values are `null`."""
    out: list[str] = []
    _check(doc, SCHEMA, "$", out)
    return out
