"""Spawns one gloo process group per world size (once per session) and hands its results to tests."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from . import worker

DEADLINE_S = {2: 180, 4: 240}  # whole spawned run; collectives time out after worker.TIMEOUT_S


def run_world(world: int) -> list[dict]:
    """Run every case of `world` in `world` spawned processes; one result dict per rank."""
    out_dir = tempfile.mkdtemp(prefix=f"attnkit_cp{world}_")
    # the parent hosts the rendezvous store on a free port (port 0: the OS picks), so no race
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=worker.TIMEOUT_S))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker.main, args=(r, world, store.port, out_dir), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S[world]
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {})
    if hung:
        for res in results:
            res.setdefault("__hung__", f"ranks {hung} still running after {DEADLINE_S[world]} s")
    del store
    return results


_CACHE: dict[int, list[dict]] = {}


@pytest.fixture(scope="session")
def world_results():
    def get(world: int) -> list[dict]:
        if world not in _CACHE:
            _CACHE[world] = run_world(world)
        return _CACHE[world]

    return get


def case_result(results: list[dict], name: str, rank: int = 0) -> dict:
    """The result of case `name` on `rank`, failing with the worker's traceback if it raised."""
    res = results[rank]
    assert name in res, f"case {name!r} produced no result on rank {rank} ({res.get('__hung__', 'run ended early')})"
    assert "error" not in res[name], f"case {name!r} raised on rank {rank}:\n{res[name]['error']}"
    return res[name]
