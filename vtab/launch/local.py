"""The local launcher behind main_runner.py: parse the options, find the environment (devices,
CPUs, host id: under SLURM, what the allocation grants), check devices before anything is
claimed, and run one runner per device, one process each, reporting the worst exit code."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from vtab.devices import CPU, DeviceError, check_devices, claim_gpu, parse_devices, physical_gpu
from vtab.errors import VtabError
from vtab.launch.environment import GPUS_AS_CPU, Environment, discover
from vtab.pipeline import DEFAULT_MAX_GRID_POINTS
from vtab.runner import (
    BLOCKED_EXIT,
    CANNOT_RUN_EXIT,
    CRASHED_EXIT,
    DEFAULT_MAX_BATCH,
    DRAINED_EXIT,
    STOP_SIGNALS,
    Runner,
    RunnerSettings,
)
from vtab.schema import validate as validate_schema
from vtab.workarea import AreaSettings, StorageError, WorkArea

log = logging.getLogger("vtab.runner")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main_runner.py",
        description="Start runners that drain a work area: one process per --devices entry.",
        epilog="Exit codes (the worst of all runners, in this order): 128+N stopped by signal "
               "N; 2 a runner could not run jobs here (bad --devices, broken install, weights "
               "it cannot fetch, storage failing) or bad arguments; 3 drained, but jobs in "
               "waiting/ wait on crashed jobs; 4 drained, but jobs crashed; 0 drained, "
               "everything finished or summarized.")
    parser.add_argument("--work_area", type=Path, default=Path("./work"),
                        help="the shared work area folder (default: ./work)")
    parser.add_argument("--devices", default=None,
                        help="comma-separated devices, one runner each: GPU indices (0,1,3) or "
                             "'cpu', which may repeat (cpu,cpu); checked before anything is "
                             "claimed; default: under SLURM one runner per granted GPU (cpu "
                             "when none), elsewhere 0 with CUDA, else cpu")
    parser.add_argument("--num_workers", type=_count(0), default=None,
                        help="data loading worker processes per runner (default: 0; under "
                             "SLURM one less than the runner's share of the allocation's "
                             "CPUs, at most 8)")
    parser.add_argument("--threads", type=_count(1), default=None,
                        help="CPU threads per runner (default: the CPUs this process may use "
                             "(under SLURM: the allocation's) / number of runners)")
    parser.add_argument("--idle_limit", type=_seconds, default=None,
                        help="exit after this many seconds without work (default: run until the "
                             "work area is drained)")
    parser.add_argument("--max_jobs", type=_count(1), default=None,
                        help="exit after handling this many jobs (default: no limit)")
    parser.add_argument("--max_batch", type=_count(1), default=DEFAULT_MAX_BATCH,
                        help="queued sibling jobs that differ only in what each head keeps "
                             "for itself (learning rate, weight decay, momentum) are claimed "
                             "together and trained in one pass, this many at most "
                             f"(default {DEFAULT_MAX_BATCH}; 1: one job per claim)")
    parser.add_argument("--lease_timeout", type=float, default=None,
                        help="seconds without a heartbeat after which a claimed job is taken "
                             "back; a setting of the work area (meta/settings.yaml), written by "
                             "its first runner (default 60), which every later runner must "
                             "agree with")
    parser.add_argument("--settle_time", type=float, default=None,
                        help="seconds a queued file that does not end with the YAML end marker "
                             "'...' must be left unchanged before it runs (a copy may still be "
                             "writing it); a setting of the work area like --lease_timeout "
                             "(default 10)")
    parser.add_argument("--max_attempts", type=_count(1), default=RunnerSettings.max_attempts,
                        help="attempts per stage before a job is crashed (default: %(default)s)")
    parser.add_argument("--poll_interval", type=_seconds, default=RunnerSettings.poll_interval,
                        help="seconds between looks at an empty queue (default: %(default)s)")
    parser.add_argument("--max_grid_points", type=_count(1), default=DEFAULT_MAX_GRID_POINTS,
                        help="refuse grids larger than this (default: %(default)s)")
    parser.add_argument("--cache_dir", type=Path, default=None,
                        help="feature cache folder (default: <work_area>/cache/features)")
    parser.add_argument("--host_id", default=None,
                        help="host name recorded in leases and results (default: the hostname; "
                             "under SLURM <hostname>-slurm<job id>[_<array index>])")
    parser.add_argument("--module_backbones", default="",
                        help="comma-separated modules (or packages) whose functions jobs may "
                             "use as backbones (backbone.source: module); such a job runs code "
                             "it names, so none is trusted by default")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bars (they are shown only when stderr is a terminal)")
    parser.add_argument("--runner_index", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def settings_from(args: argparse.Namespace) -> RunnerSettings:
    return RunnerSettings(lease_timeout=args.lease_timeout, settle_time=args.settle_time,
                          max_attempts=args.max_attempts,
                          idle_limit=args.idle_limit, max_jobs=args.max_jobs,
                          max_batch=args.max_batch,
                          num_workers=args.num_workers,
                          cache_dir=args.cache_dir, max_grid_points=args.max_grid_points,
                          progress=not args.no_progress and sys.stderr.isatty(),
                          host=args.host_id,
                          trusted_modules=tuple(m.strip() for m in
                                                args.module_backbones.split(",") if m.strip()),
                          poll_interval=args.poll_interval)


def run_one(args: argparse.Namespace, device: str) -> int:
    """Run one runner in this process, pinned to `device` ('cpu' or a GPU index)."""
    index = f"#{args.runner_index}" if args.runner_index is not None else ""
    torch_device = "cpu" if device == CPU else "cuda"
    name = f"{args.host_id}:{os.getpid()}:{device}{index}"
    logging.basicConfig(level=logging.INFO, force=True,
                        format=f"%(asctime)s [{name}] %(levelname)s %(message)s")
    if device != CPU and os.environ.get(GPUS_AS_CPU):
        log.warning("GPU %s (physical %s) resolved for this runner; %s is set: running on the "
                    "CPU instead", device, physical_gpu(device), GPUS_AS_CPU)
        torch_device = "cpu"
    elif device != CPU:  # before torch is imported by a job: CUDA reads the mask once
        os.environ["CUDA_VISIBLE_DEVICES"] = physical_gpu(device) or device
        problem = claim_gpu()
        if problem is not None:
            log.error("--devices %s: %s; stopping before claiming anything", device, problem)
            return CANNOT_RUN_EXIT
    if args.threads:
        # torch reads it when first imported (by a job); importing torch here would delay the
        # runner's signal handlers by seconds.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        if "torch" in sys.modules:  # a GPU runner imported it to claim its device
            sys.modules["torch"].set_num_threads(args.threads)
    area = WorkArea(args.work_area)
    return Runner(area, settings_from(args), torch_device, name).run()


def supervise(args: argparse.Namespace, argv: list[str], devices: list[str],
              environment: Environment) -> int:
    """One child process per device; stop signals are passed on; exit with the worst code."""
    threads = args.threads or max(1, environment.cpus // len(devices))
    children = []
    for index, device in enumerate(devices):
        env = dict(os.environ)
        if device == CPU:
            env["CUDA_VISIBLE_DEVICES"] = ""
        command = [sys.executable, "-m", "vtab.launch.local", *argv, "--devices", device,
                   "--host_id", args.host_id, "--runner_index", str(index),
                   "--threads", str(threads), "--num_workers", str(args.num_workers)]
        children.append(subprocess.Popen(command, env=env))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    worst = worst_exit_code(codes)
    print(f"main_runner: {len(children)} runners exited with codes {codes}: "
          f"{describe_exit_code(worst)}", flush=True)
    return worst


_EXIT_RANK = {DRAINED_EXIT: 0, CRASHED_EXIT: 1, BLOCKED_EXIT: 2, CANNOT_RUN_EXIT: 3}


def worst_exit_code(codes: list[int]) -> int:
    """The code that says most: a signal (a killed child, -N, becomes 128+N), then a runner
    that could not run jobs (2), then blocked waiting jobs (3), then crashed jobs (4), then
    drained (0)."""
    shell = [128 - code if code < 0 else code for code in codes]
    return max(shell, key=lambda code: _EXIT_RANK.get(code, len(_EXIT_RANK) + code))


def describe_exit_code(code: int) -> str:
    meanings = {DRAINED_EXIT: "drained, everything finished or summarized",
                CRASHED_EXIT: "drained, but jobs crashed (see crashed/)",
                BLOCKED_EXIT: "drained, but waiting jobs wait on crashed jobs",
                CANNOT_RUN_EXIT: "a runner could not run jobs here"}
    if code > 128:
        return f"stopped by signal {code - 128}"
    return meanings.get(code, "a runner failed unexpectedly")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    environment = discover()
    args.host_id = args.host_id or environment.host_id
    if args.devices is None:
        args.devices = environment.default_devices()
    try:
        devices = parse_devices(args.devices)
    except DeviceError as exc:
        parser.error(str(exc))
    if args.num_workers is None:
        args.num_workers = environment.data_workers(len(devices))
    if args.runner_index is None:  # a runner started by `supervise` was checked by it
        print(f"main_runner: {environment.describe()}; devices {','.join(devices)}",
              file=sys.stderr, flush=True)
        problems = _device_problems(devices)
        if problems:
            for problem in problems:
                print(f"main_runner: {problem}", file=sys.stderr)
            print("main_runner: nothing was claimed; the work area is untouched",
                  file=sys.stderr)
            return CANNOT_RUN_EXIT
    try:  # the area and its settings, before any runner starts (and claims anything)
        wanted = settings_from(args).area_settings()
        validate_schema(AreaSettings, wanted)  # bad values, before the area is touched
        WorkArea(args.work_area).settings(wanted)
    except (VtabError, StorageError) as exc:
        key = getattr(exc, "key", None)
        print(f"main_runner: {'--' + key + ': ' if key else ''}"
              f"{getattr(exc, 'message', exc)}", file=sys.stderr)
        return CANNOT_RUN_EXIT
    if len(devices) == 1:
        if args.threads is None:
            args.threads = environment.cpus
        return run_one(args, devices[0])
    return supervise(args, _without(argv, ("--devices", "--host_id", "--num_workers")), devices,
                     environment)


def _device_problems(devices: list[str]) -> list[str]:
    """check_devices; with GPUS_AS_CPU set (tests on fake GPUs) only that each index names a
    GPU this process was granted."""
    if not os.environ.get(GPUS_AS_CPU):
        return check_devices(devices)
    return [f"--devices: GPU index {d} is not among the GPUs granted (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            for d in devices if d != CPU and physical_gpu(d) is None]


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` without `flags` and their values (the supervisor sets them per child)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in flags)):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
