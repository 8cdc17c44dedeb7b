"""The blockwise reference stays linear in T: forward + backward at T = 32768, B = 1, H = 4,
D = 64, float32, uses at most 256 MiB beyond inputs, outputs and gradients (issue 2).

Measured in a fresh subprocess (peak RSS), so no other test's allocations interfere. A
`T x T` float32 score matrix at this size would be 4 GiB per head."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT = 256 * 2**20


@pytest.mark.slow
def test_blockwise_forward_backward_memory_is_linear_in_T() -> None:
    probe = Path(__file__).with_name("memory_probe.py")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run([sys.executable, str(probe), "32768", "1", "4", "64"], capture_output=True, text=True,
                         timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    extra = m["peak"] - m["baseline"]
    print(f"blockwise T=32768 fwd+bwd: {extra / 2**20:.1f} MiB beyond inputs/outputs/grads, {m['seconds']:.1f} s")
    assert m["finite"], "gradients are not finite"
    assert extra <= LIMIT, f"peak extra memory {extra / 2**20:.1f} MiB exceeds {LIMIT / 2**20:.0f} MiB"
