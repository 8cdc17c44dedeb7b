"""Settings of the property-based fuzz suite.

CI runs a bounded, reproducible profile (`derandomize=True`, a few examples per property, no
deadline: the machine is shared). `ATTNKIT_FUZZ_EXAMPLES=N` runs N examples per property, for a
long run before a release: `ATTNKIT_FUZZ_EXAMPLES=500 pytest tests/fuzz`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES_ENV = "ATTNKIT_FUZZ_EXAMPLES"
CI_EXAMPLES = 5


def fuzz_examples() -> int:
    raw = os.environ.get(FUZZ_EXAMPLES_ENV, "")
    if not raw:
        return CI_EXAMPLES
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{FUZZ_EXAMPLES_ENV}: expected an int >= 1, got {raw!r}")
    return int(raw)


def fuzz(examples_scale: float = 1.0) -> settings:
    """Settings for one property: `examples_scale` times the profile's examples (at least 1)."""
    return settings(max_examples=max(1, round(fuzz_examples() * examples_scale)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))
