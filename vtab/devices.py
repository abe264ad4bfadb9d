"""The devices runners are pinned to: read from ``--devices``, probed before anything is claimed,
and the failures of a job that are the device's fault rather than the job's.

GPU indices count within an inherited ``CUDA_VISIBLE_DEVICES`` (SLURM sets one), as CUDA's own
do. torch is imported only when a GPU is asked for.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

CPU = "cpu"
FLAG = "--devices"
PROBE_TIMEOUT = 300  # seconds; importing torch and initialising CUDA can take a while


class DeviceError(Exception):
    """A ``--devices`` entry that this machine cannot honour; the message names the entry."""


def parse_devices(text: str) -> list[str]:
    """The entries of ``--devices``: ``cpu`` or GPU indices (written plainly: ``01`` is ``1``).

    An entry may repeat, to run several runners on one device (``cpu,cpu``, ``0,0``).
    """
    entries = [entry.strip() for entry in text.split(",")]
    for position, entry in enumerate(entries, start=1):
        if entry != CPU and not re.fullmatch(r"[0-9]+", entry):
            raise DeviceError(f"{FLAG} {text!r}: entry {position} {_why_not(entry)}; expected "
                              "GPU indices (0,1,3) or cpu, which may repeat (cpu,cpu)")
    return [entry if entry == CPU else str(int(entry)) for entry in entries]


def _why_not(entry: str) -> str:
    if not entry:
        return "is blank"
    if re.fullmatch(r"cuda:?[0-9]+", entry):
        return (f"{entry!r} is written as a torch device; write the index alone "
                f"({re.sub(r'[^0-9]', '', entry)})")
    if re.fullmatch(r"-[0-9]+", entry):
        return f"{entry!r} is negative"
    return f"{entry!r} is not a device"


def default_devices() -> str:
    """``0`` where a GPU is likely (an inherited non-empty mask, or a driver), else ``cpu``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # set empty, it hides every GPU
        return "0" if visible.strip() else CPU
    return "0" if Path("/dev/nvidia0").exists() else CPU


def physical_gpu(index: str) -> str | None:
    """The GPU that `index` names: the index-th entry of an inherited CUDA_VISIBLE_DEVICES,
    else the index itself; None if the mask has no such entry."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is None:
        return index
    visible = [entry.strip() for entry in inherited.split(",") if entry.strip()]
    return visible[int(index)] if int(index) < len(visible) else None


def check_devices(devices: list[str]) -> list[str]:
    """Problems with the GPU entries of `devices`, one message each; ``cpu`` always works."""
    gpus = sorted({d for d in devices if d != CPU}, key=int)
    if not gpus:
        return []
    unseen = [d for d in gpus if physical_gpu(d) is None]
    if unseen:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        return [f"{FLAG}: GPU index {d} is not among the CUDA_VISIBLE_DEVICES={mask!r} this "
                "runner inherited (indices count within it)" for d in unseen]
    count, reason = visible_gpu_count()
    if count == 0:
        return [f"{FLAG} {','.join(gpus)}: this machine has no usable CUDA GPU ({reason}); "
                f"use {FLAG} cpu"]
    return [f"{FLAG}: GPU {d} does not exist: {count} GPU(s) are visible here "
            f"(0-{count - 1})" for d in gpus if int(d) >= count]


def visible_gpu_count() -> tuple[int, str]:
    """How many GPUs torch sees, and why none when it sees none.

    Asked in a fresh interpreter: CUDA reads CUDA_VISIBLE_DEVICES once, when a process first
    touches it, and a runner must still be free to narrow it to its own GPU afterwards.
    """
    try:
        probe = subprocess.run([sys.executable, "-m", "vtab.devices"], capture_output=True,
                               text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return 0, f"the GPU probe did not answer within {PROBE_TIMEOUT} s (a hung driver?)"
    try:
        answer = json.loads(probe.stdout.strip().splitlines()[-1])
        return int(answer["count"]), str(answer["reason"])
    except (ValueError, KeyError, IndexError):
        said = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return 0, f"the GPU probe failed (exit code {probe.returncode}): {said}"


def _count_here() -> tuple[int, str]:
    try:
        import torch
    except Exception as exc:  # a broken install is a reason too
        return 0, f"torch cannot be imported: {type(exc).__name__}: {exc}"
    if torch.version.cuda is None:
        return 0, f"torch {torch.__version__} is a build without CUDA"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torch.cuda.is_available():
            return torch.cuda.device_count(), ""
        try:
            torch.cuda.init()  # says why: no driver, driver too old, ...
        except Exception as exc:
            return 0, str(exc).splitlines()[0]
    return 0, "torch.cuda.is_available() is False"


def claim_gpu() -> str | None:
    """Put a tensor on the one GPU this process sees; a problem message if that fails."""
    try:
        import torch

        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except Exception as exc:
        return f"cannot use the GPU: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


_DEVICE_FAULTS = ("CUDA error", "CUDA driver", "NVIDIA driver", "no CUDA GPUs",
                  "CUDA-capable device", "cudaErrorDevicesUnavailable")


def environment_failure(exc: BaseException) -> str | None:
    """Why `exc` is the device's fault (out of memory, a lost or busy GPU), or None if not.

    Such a job is given back and its runner stops: on another device it may well run.
    """
    module = type(exc).__module__.split(".")[0]
    if module == "torch" and type(exc).__name__ == "OutOfMemoryError":
        return "the device ran out of memory (another process may hold it)"
    if isinstance(exc, RuntimeError) and any(fault in str(exc) for fault in _DEVICE_FAULTS):
        return "the device failed"
    return None


if __name__ == "__main__":  # the probe behind visible_gpu_count
    count, reason = _count_here()
    print(json.dumps({"count": count, "reason": reason}))
