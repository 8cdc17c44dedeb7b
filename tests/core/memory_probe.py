"""Run in a subprocess by test_memory.py: peak RSS of blockwise attention forward + backward.

Prints one JSON line: baseline RSS after allocating inputs, output-sized and gradient-sized
buffers, and the peak RSS during forward + backward, both in bytes.
"""

import json
import resource
import sys
import time

import torch

from attnkit.core.reference import blockwise_attention


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    T, B, H, D = (int(x) for x in sys.argv[1:5])
    torch.manual_seed(0)
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = torch.randn(B, T, H, D, requires_grad=True)
    v = torch.randn(B, T, H, D, requires_grad=True)
    dout = torch.randn(B, T, H, D)
    # buffers the size of what forward + backward must return (out, dq, dk, dv), touched so they are resident
    reserved = [torch.ones(B, T, H, D) for _ in range(4)]
    base = rss_now()
    del reserved
    t0 = time.perf_counter()
    out, lse = blockwise_attention(q, k, v, causal=True)
    out.backward(dout)
    secs = time.perf_counter() - t0
    print(json.dumps({"baseline": base, "peak": rss_peak(), "seconds": secs, "finite": bool(q.grad.isfinite().all())}))


if __name__ == "__main__":
    main()
