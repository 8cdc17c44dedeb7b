"""A thin layer over `torch.distributed` for context parallelism: group bookkeeping, overlapped
point-to-point exchanges (`batch_isend_irecv`), collectives, byte counting, and the agreement
check that turns a wrong-sized shard on one rank into the same clear error on every rank.

Any backend works (NCCL on GPUs, gloo on CPUs). When the backend cannot move the tensors' device
(gloo with CUDA tensors, e.g. several processes sharing one GPU) the tensors are staged through
host memory, which is correct but slow; the benchmark says when that happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..core.contract import AttnkitError

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@dataclass
class CommStats:
    """Bytes this rank sent (payload of its sends and its share of collectives), per phase."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_messages: int = 0
    backward_messages: int = 0
    steps: int = 0  # ring steps run (1 = local only)
    skipped_steps: int = 0  # steps of the selection-aware exchange that no rank needed
    calls: int = 0  # local attention calls made in the forward pass
    kernels: dict[str, str] = field(default_factory=dict)  # kernel name -> why (faster ones passed over)
    notes: list[str] = field(default_factory=list)

    def add(self, phase: str, nbytes: int, messages: int = 1) -> None:
        if phase == "forward":
            self.forward_bytes += nbytes
            self.forward_messages += messages
        else:
            self.backward_bytes += nbytes
            self.backward_messages += messages


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Pending:
    """Posted sends and receives; `wait()` (idempotent) returns the received tensors in the order asked."""

    def __init__(self, works: list, sent: list[torch.Tensor], received: list[torch.Tensor],
                 staged: list[Optional[torch.device]]) -> None:
        self.works, self.sent, self.received, self.staged = works, sent, received, staged
        self._result: Optional[list[torch.Tensor]] = None

    def wait(self) -> list[torch.Tensor]:
        if self._result is None:
            for w in self.works:
                w.wait()
            self.works, self.sent = [], []
            self._result = [t if dev is None else t.to(dev) for t, dev in zip(self.received, self.staged)]
        return self._result


class Comm:
    """One process group as context parallelism uses it; ranks are group ranks."""

    def __init__(self, group: Optional[dist.ProcessGroup], what: str) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise AttnkitError(
                f"group: {what} needs torch.distributed to be initialized "
                "(torch.distributed.init_process_group(...), e.g. under torchrun)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.what = what
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise AttnkitError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group")
        self.world = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group)).lower()

    # --- helpers ----------------------------------------------------------------------------

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not dist.group.WORLD else group_rank

    def _stage(self, t: torch.Tensor) -> bool:
        return t.device.type != "cpu" and self.backend == "gloo"

    def _meta_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # --- point to point ---------------------------------------------------------------------

    def exchange(
        self,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[tuple[int, ...], torch.dtype, torch.device, int]],
        stats: Optional[CommStats] = None,
        phase: str = "forward",
    ) -> Pending:
        """Post `sends` ((tensor, group rank)) and `recvs` ((shape, dtype, device, group rank)) at
        once, without waiting; the caller computes meanwhile and waits on the returned handle."""
        ops, sent, received, staged = [], [], [], []
        for t, peer in sends:
            t = t.contiguous()
            if self._stage(t):
                t = t.cpu()
            sent.append(t)
            ops.append(dist.P2POp(dist.isend, t, self.global_rank(peer), self.group))
            if stats is not None:
                stats.add(phase, _nbytes(t))
        for shape, dtype, device, peer in recvs:
            stage = device.type != "cpu" and self.backend == "gloo"
            buf = torch.empty(shape, dtype=dtype, device="cpu" if stage else device)
            received.append(buf)
            staged.append(device if stage else None)
            ops.append(dist.P2POp(dist.irecv, buf, self.global_rank(peer), self.group))
        works = dist.batch_isend_irecv(ops) if ops else []
        return Pending(works, sent, received, staged)

    # --- collectives ------------------------------------------------------------------------

    def broadcast(self, t: torch.Tensor, src: int, stats: Optional[CommStats] = None, phase: str = "forward") -> torch.Tensor:
        dev = t.device
        buf = t.cpu() if self._stage(t) else t.clone(memory_format=torch.contiguous_format)
        dist.broadcast(buf, self.global_rank(src), group=self.group)
        if stats is not None and self.rank == src:
            stats.add(phase, _nbytes(buf) * (self.world - 1))
        return buf.to(dev)

    def all_reduce(self, t: torch.Tensor, stats: Optional[CommStats] = None, phase: str = "backward") -> torch.Tensor:
        dev = t.device
        buf = t.contiguous().cpu() if self._stage(t) else t.contiguous().clone()
        dist.all_reduce(buf, group=self.group)
        if stats is not None:
            stats.add(phase, _nbytes(buf))
        return buf.to(dev)

    def all_to_all(self, x: torch.Tensor, stats: Optional[CommStats] = None, phase: str = "forward") -> torch.Tensor:
        """`x: [W, ...]`, row j goes to rank j; returns `[W, ...]`, row i came from rank i."""
        dev = x.device
        send = x.contiguous().cpu() if self._stage(x) else x.contiguous()
        out = torch.empty_like(send)
        dist.all_to_all_single(out, send, group=self.group)
        if stats is not None:
            stats.add(phase, _nbytes(send) * (self.world - 1) // self.world)
        return out.to(dev)

    def all_gather(self, x: torch.Tensor, stats: Optional[CommStats] = None, phase: str = "forward") -> list[torch.Tensor]:
        dev = x.device
        send = x.contiguous().cpu() if self._stage(x) else x.contiguous()
        parts = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(parts, send, group=self.group)
        if stats is not None:
            stats.add(phase, _nbytes(send) * (self.world - 1))
        return [p.to(dev) for p in parts]

    # --- agreement ----------------------------------------------------------------------------

    def agree(self, problem: Optional[str], signature: Sequence[int], describe) -> None:
        """Raise the same `AttnkitError` on every rank if any rank has a local `problem` or a
        `signature` (shapes, dtype, options as ints) different from rank 0's.

        One small all-gather, run before any other communication, so a bad shard on one rank
        never leaves the others waiting in a ring step. `describe(sig)` renders a signature.
        A group of one has nothing to agree on: no communication, no device synchronisation."""
        if self.world == 1:
            if problem is not None:
                raise AttnkitError(problem)
            return
        sig = [int(x) for x in signature]
        vec = torch.tensor([0 if problem is None else 1, len(sig)] + sig, dtype=torch.int64, device=self._meta_device())
        width = torch.tensor([vec.numel()], dtype=torch.int64, device=vec.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
        padded = torch.full((int(width.item()),), -1, dtype=torch.int64, device=vec.device)
        padded[: vec.numel()] = vec
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        rows = [p.cpu().tolist() for p in parts]
        sigs = [r[2: 2 + r[1]] for r in rows]
        bad = [r for r, row in enumerate(rows) if row[0] == 1]
        if bad:
            texts: list[Optional[str]] = [None] * self.world
            dist.all_gather_object(texts, problem, group=self.group)
            if len(bad) == self.world and len(set(texts)) == 1:  # the same mistake everywhere: say it as is
                raise AttnkitError(str(texts[0]))
            lines = "; ".join(f"rank {r}: {texts[r]}" for r in bad)
            raise AttnkitError(f"{self.what}: invalid input on {len(bad)} of {self.world} ranks: {lines}")
        differ = [r for r in range(self.world) if sigs[r] != sigs[0]]
        if differ:
            lines = "; ".join(f"rank {r} has {describe(sigs[r])}" for r in [0] + differ)
            raise AttnkitError(
                f"q: {self.what} needs the same shard shapes, dtype and options on every rank of the group, "
                f"but {lines} (shard the global sequence with attnkit.distributed.shard)"
            )


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if 0 <= code < len(_DTYPES) else "?"
