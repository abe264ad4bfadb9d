"""A stand-in for torch that reports GPUs, for tests of device pinning on machines without one.

Put its parent folder first on PYTHONPATH of a runner process whose jobs never touch torch
(``sleep`` jobs). It answers what the runner asks when it probes and pins devices: how many GPUs
are visible (``VTAB_FAKE_GPUS`` physical ones, 8 by default, seen through CUDA_VISIBLE_DEVICES)
and whether a tensor can be put on one.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.0+fake"


class version:  # mirrors torch.version
    cuda = "fake"


def _visible() -> int:
    physical = int(os.environ.get("VTAB_FAKE_GPUS", "8"))
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return physical
    return sum(1 for entry in mask.split(",") if entry.strip().isdigit()
               and int(entry) < physical)


class cuda:  # mirrors torch.cuda
    @staticmethod
    def is_available() -> bool:
        return _visible() > 0

    @staticmethod
    def device_count() -> int:
        return _visible()

    @staticmethod
    def init() -> None:
        if not _visible():
            raise RuntimeError("no CUDA GPUs are available (fake)")

    @staticmethod
    def synchronize() -> None:
        pass

    @staticmethod
    def get_device_name(index: int = 0) -> str:
        return "fake GPU"


class _Tensor:
    def add_(self, other: Any) -> _Tensor:
        return self


def zeros(*shape: int, device: str = "cpu") -> _Tensor:
    if device.startswith("cuda") and not _visible():
        raise RuntimeError("CUDA error: no CUDA-capable device is detected (fake)")
    return _Tensor()


def set_num_threads(count: int) -> None:
    pass
