"""Ring attention, Ulysses and the hybrid under torchrun, checked against one-process attention.

    torchrun --nproc-per-node 4 examples/torchrun_ring.py                  # CPU, gloo
    torchrun --nproc-per-node 8 examples/torchrun_ring.py --cuda --ulysses 2   # GPUs, NCCL

Every rank builds the same global q, k, v (same seed), takes its shard, runs the distributed
op forward and backward, and rank 0 prints the largest difference from single-process attention.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

import attnkit
import attnkit.distributed as cp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cuda", action="store_true", help="NCCL on one GPU per rank (default: gloo on CPU)")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--ulysses", type=int, default=2, help="Ulysses group size for the hybrid")
    args = p.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # a timeout turns a rank that never arrives into an error instead of a hang
    dist.init_process_group("nccl" if args.cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda") if args.cuda else torch.device("cpu")
    dtype = torch.bfloat16 if args.cuda else torch.float32

    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D = 1, args.seqlen, args.heads, args.kv_heads, 64
    q = torch.randn(B, T, H, D, generator=g).to(device, dtype)
    k = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(B, T, Hkv, D, generator=g).to(device, dtype)
    options = {} if args.window is None else {"window": args.window}
    want = attnkit.attention(q.float(), k.float(), v.float(), method="sliding_window" if args.window else "dense",
                             causal=True, **options)

    def report(name: str, out_local: torch.Tensor, layout: str, hybrid: bool = False) -> None:
        parts = [torch.empty_like(out_local) for _ in range(world)]
        dist.all_gather(parts, out_local.contiguous())
        full = (cp.hybrid_unshard(parts, world // args.ulysses, args.ulysses, layout) if hybrid
                else cp.unshard(parts, layout))
        if rank == 0:
            print(f"{name:<28} max |out - single process| = {(full.float() - want).abs().max().item():.2e}")

    # ring attention, zigzag layout (balanced causal work); backward works as usual
    ql, kl, vl = (cp.shard(x, world, rank, "zigzag").requires_grad_(True) for x in (q, k, v))
    stats = cp.CommStats()
    out = cp.ring_attention(ql, kl, vl, causal=True, layout="zigzag", window=args.window, stats=stats)
    out.sum().backward()
    report("ring (zigzag)", out.detach(), "zigzag")
    if rank == 0:
        print(f"{'':<28} rank 0 sent {stats.forward_bytes} B forward, {stats.backward_bytes} B backward")

    # Ulysses: any attnkit method runs locally on H / W heads of the whole sequence
    if H % world == 0:
        ql, kl, vl = (cp.shard(x, world, rank, "contiguous") for x in (q, k, v))
        out = cp.ulysses_attention(ql, kl, vl, method="sliding_window" if args.window else "dense", causal=True,
                                   layout="contiguous", **options)
        report("ulysses", out, "contiguous")

    # hybrid: Ulysses inside groups of `--ulysses` ranks, ring across them
    if world % args.ulysses == 0 and H % args.ulysses == 0:
        groups = cp.hybrid_groups(args.ulysses)
        R = world // args.ulysses
        ql, kl, vl = (cp.hybrid_shard(x, R, args.ulysses, rank, "zigzag") for x in (q, k, v))
        out = cp.hybrid_attention(ql, kl, vl, groups, causal=True, layout="zigzag", window=args.window)
        report(f"hybrid (U={args.ulysses} x R={R})", out, "zigzag", hybrid=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
