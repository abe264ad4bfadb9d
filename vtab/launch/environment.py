"""What a runner finds where it starts: the GPUs it was granted, the CPUs it may use, a host id.

Under SLURM (``SLURM_JOB_ID`` set) the GPUs are those SLURM granted, as it exposes them in
``CUDA_VISIBLE_DEVICES`` (never guessed from the node), the CPUs those of the allocation
(``SLURM_CPUS_PER_TASK``, ``SLURM_JOB_CPUS_PER_NODE``, bounded by the process's affinity), and
the host id carries the SLURM job id and array index, so that ``main_status.py`` shows which
SLURM job holds which vtab job. Elsewhere: the machine's CPUs and its host name.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from vtab.devices import CPU, default_devices

# For tests on machines whose GPUs are fake (SLURM gres on device files that run no kernels):
# runners log the GPUs they resolved, then run on the CPU. Never set it for real work.
GPUS_AS_CPU = "VTAB_GPUS_AS_CPU"
MAX_DATA_WORKERS = 8


@dataclass(frozen=True)
class Environment:
    scheduler: str  # "local" or "slurm"
    host_id: str
    cpus: int  # CPUs this process may use, for all its runners
    granted_gpus: tuple[str, ...] | None  # what SLURM granted (physical ids); None: not SLURM
    slurm_job: str | None  # "4242" or, in an array, "4240_2"

    def default_devices(self) -> str:
        """One runner per granted GPU under SLURM (cpu when none was granted); elsewhere the
        local default (GPU 0 where one is likely, else cpu)."""
        if self.granted_gpus is None:
            return default_devices()
        return ",".join(map(str, range(len(self.granted_gpus)))) or CPU

    def data_workers(self, runners: int) -> int:
        """DataLoader workers per runner: none locally (the default it always had); under
        SLURM one less than each runner's share of the allocation's CPUs, at most 8."""
        if self.scheduler != "slurm":
            return 0
        return min(MAX_DATA_WORKERS, max(0, self.cpus // max(1, runners) - 1))

    def describe(self) -> str:
        if self.scheduler != "slurm":
            return f"{self.host_id}: {self.cpus} CPU(s)"
        gpus = ",".join(self.granted_gpus or ()) or "none"
        return (f"SLURM job {self.slurm_job} on {self.host_id}: {self.cpus} CPU(s), "
                f"GPUs granted: {gpus}")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _slurm_cpus(environ: Mapping[str, str]) -> int | None:
    """The CPUs of this node's share of the allocation, as SLURM states it."""
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        return int(per_task)
    per_node = re.match(r"\d+", environ.get("SLURM_JOB_CPUS_PER_NODE", ""))  # "4" or "2(x3)"
    return int(per_node.group()) if per_node else None


def _slurm_job(environ: Mapping[str, str]) -> str:
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else environ["SLURM_JOB_ID"]


def discover(environ: Mapping[str, str] | None = None) -> Environment:
    environ = os.environ if environ is None else environ
    host = socket.gethostname()
    if "SLURM_JOB_ID" not in environ:
        return Environment("local", host, _affinity(), None, None)
    job = _slurm_job(environ)
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    granted = tuple(g.strip() for g in mask.split(",") if g.strip()) if mask else ()
    cpus = min(filter(None, (_affinity(), _slurm_cpus(environ))))
    return Environment("slurm", f"{host}-slurm{job}", cpus, granted, job)
