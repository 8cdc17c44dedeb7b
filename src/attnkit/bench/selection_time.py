"""The selection alone, so the benchmark can time it.

End-to-end rows time selection plus executor; `select_ms` isolates the first part (the selection
must not dominate on the GPU). The selection is the spec's `select(call, opts)` (one signature for
every method), called with the validated call and the parsed options, as the executor backends
call it.

A method without a selection (dense, mask predicates such as sliding windows, the linear family)
has no separate selection: `selection_fn` returns None and the row reports `select_ms` as absent
(null, shown as '-'), never as zero.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..core.contract import AttentionCall
from ..registry import MethodSpec, parse_options


def selection_fn(spec: MethodSpec, call: AttentionCall, options: dict[str, Any]) -> Optional[Callable[[], Any]]:
    """A zero-argument callable running the method's selection on `call` with `options`, or None.

    Raises (an option error, a missing option) when the options cannot be parsed; the runner
    records that in the row's notes."""
    if spec.select is None:
        return None
    select, opts = spec.select, parse_options(spec, call, options)
    return lambda: select(call, opts)
