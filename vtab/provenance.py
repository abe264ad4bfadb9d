"""Where a result came from: code version, libraries, host and device."""

from __future__ import annotations

import functools
import os
import platform
import resource
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import vtab


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.cache
def code_version() -> str:
    """The package version, plus the git commit (and ``.dirty``) when run from a checkout."""
    repo = Path(vtab.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return vtab.__version__
    try:
        sha = _git(repo, "rev-parse", "--short=12", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return vtab.__version__
    return f"{vtab.__version__}+g{sha}{'.dirty' if dirty else ''}"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware; torch is looked at only once a job has imported it."""
    info: dict[str, Any] = {**_base(device),
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if "torch" in sys.modules:
        info.update(_torch_info(device))
    return info


@functools.cache
def _base(device: str) -> dict[str, Any]:
    return {"python": platform.python_version(), "code_version": code_version(),
            "device": device}


def _torch_info(device: str) -> dict[str, Any]:
    import torch

    info = {"torch": str(torch.__version__)}
    torchvision = sys.modules.get("torchvision")
    if torchvision is not None:
        info["torchvision"] = str(torchvision.__version__)
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def peak_memory_mib() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)
