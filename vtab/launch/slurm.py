"""SLURM submission: main_sbatch_runner.py renders an sbatch script from a template and submits
it in one ``sbatch`` call (a job array for many runners). Rendering is a pure function of the
options, tested as text; only `submit` runs a command.

Options come from the command line, over ``sbatch_config.yaml`` (see
``sbatch_config.example.yaml``), over defaults that need no set-up: the interpreter that
submits, the current directory. Every argument main_sbatch_runner.py does not know is handed to
the runners (``main_runner.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import Field

from vtab import yamlio
from vtab.errors import ConfigError, VtabError
from vtab.schema import Section, validate
from vtab.workarea import RUNNING, WAITING, WorkArea

TEMPLATE = Path(__file__).with_name("sbatch.template")
DEFAULT_CONFIG = Path("sbatch_config.yaml")
REPO = Path(__file__).resolve().parents[2]
_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")  # SLURM's [days-]hours[:minutes[:seconds]]


class SbatchConfig(Section):
    """What a cluster needs beside the command line: sbatch_config.yaml."""

    account: str | None = Field(None, description="#SBATCH --account")
    partition: str | None = Field(None, description="#SBATCH --partition")
    qos: str | None = Field(None, description="#SBATCH --qos")
    time: str | None = Field(None, description="#SBATCH --time ([days-]hh:mm:ss)")
    gpus: int = Field(1, ge=0, le=64, description="GPUs per job (0: CPU runners)")
    cpus_per_gpu: int | None = Field(None, ge=1, le=1024,
                                     description="#SBATCH --cpus-per-gpu")
    cpus: int | None = Field(None, ge=1, le=4096,
                             description="#SBATCH --cpus-per-task (CPU-only jobs)")
    mem: str | None = Field(None, description="#SBATCH --mem (e.g. 64G)")
    array: int = Field(1, ge=1, le=10_000, description="how many jobs (an array when > 1)")
    signal_seconds: int = Field(120, ge=0, le=86_400,
                                description="SLURM signals the runners this long before the "
                                            "time limit, so that they give their jobs back "
                                            "(0: no signal)")
    requeue: bool = Field(False, description="a job stopped by that signal requeues itself "
                                             "while work remains")
    max_requeues: int = Field(10, ge=1, le=1000,
                              description="at most this many times (a job too long for the "
                                          "time limit would come back for ever)")
    idle_limit: float = Field(300, ge=0, description="a runner exits after this many seconds "
                                                     "without work (when only waiting jobs "
                                                     "remain); a drained area ends it at once")
    workdir: str | None = Field(None, description="where the job runs (default: the current "
                                                  "directory at submission)")
    python: str | None = Field(None, description="the interpreter (default: the one that "
                                                 "submits)")
    setup: list[str] = Field([], description="shell lines run before the runners (module "
                                             "load, source .venv/bin/activate, conda activate)")
    output_dir: str = Field("slurm", description="where scripts and logs go, under workdir")
    extra_sbatch: list[str] = Field([], description="more #SBATCH options, verbatim "
                                                    "('--constraint=a100')")
    template: str | None = Field(None, description="a template of your own (default: "
                                                   "vtab/launch/sbatch.template)")


def load_config(path: Path | None) -> dict:
    """The mapping in `path` (or ./sbatch_config.yaml when it exists), else empty."""
    path = path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if path is None:
        return {}
    try:
        return yamlio.load_mapping(path)
    except VtabError as exc:
        raise VtabError(f"{path}: {exc}") from None


def resolve(config: Mapping, overrides: Mapping, where: str) -> SbatchConfig:
    """The config file's values with the command line's on top, checked."""
    merged = {**config, **{k: v for k, v in overrides.items() if v is not None}}
    settings = validate(SbatchConfig, merged)
    if settings.time is not None and not _TIME.fullmatch(settings.time):
        raise ConfigError("time", f"{settings.time!r} is not a SLURM time "
                                  "([days-]hours[:minutes[:seconds]], e.g. 04:00:00)").in_file(
            where)
    return settings


def sbatch_lines(settings: SbatchConfig, output: str) -> list[str]:
    """The #SBATCH lines of `settings`."""
    options = [("account", settings.account), ("partition", settings.partition),
               ("qos", settings.qos), ("time", settings.time), ("mem", settings.mem)]
    lines = [f"#SBATCH --{name}={value}" for name, value in options if value is not None]
    lines += ["#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --output={output}"]
    if settings.gpus:
        lines.append(f"#SBATCH --gres=gpu:{settings.gpus}")
        if settings.cpus_per_gpu:
            lines.append(f"#SBATCH --cpus-per-gpu={settings.cpus_per_gpu}")
    if settings.cpus:
        lines.append(f"#SBATCH --cpus-per-task={settings.cpus}")
    if settings.array > 1:
        lines.append(f"#SBATCH --array=0-{settings.array - 1}")
    if settings.signal_seconds:
        lines.append(f"#SBATCH --signal=B:USR1@{settings.signal_seconds}")
    if settings.requeue:  # a requeued job appends to its log instead of starting it anew
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    lines += [f"#SBATCH {option}" for option in settings.extra_sbatch]
    return lines


def _requeue_block(settings: SbatchConfig, python: str, work_area: str) -> str:
    if not settings.requeue:
        return "# no requeue (requeue: false)"
    check = f"{python} -m vtab.launch.slurm --pending {shlex.quote(work_area)}"
    return ("# Stopped by SLURM's signal (128 + USR1) with work left: come back for it, at most\n"
            f"# {settings.max_requeues} times.\n"
            f"if [ $code -eq {128 + 10} ] && [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt "
            f"{settings.max_requeues} ] && {check}; then\n"
            "  scontrol requeue \"$SLURM_JOB_ID\" && exit 0\n"
            "fi")


def render(settings: SbatchConfig, runner_args: Sequence[str], *, workdir: str, python: str,
           work_area: str, stamp: str) -> str:
    """The sbatch script: a pure function of its inputs."""
    output = f"{settings.output_dir}/vtab-%A_%a.out" if settings.array > 1 else \
        f"{settings.output_dir}/vtab-%j.out"
    template = Path(settings.template) if settings.template else TEMPLATE
    try:
        text = template.read_text()
    except OSError as exc:
        raise ConfigError("template", f"cannot read {template}: {exc.strerror}") from None
    arguments = ["--work_area", work_area, "--idle_limit", f"{settings.idle_limit:g}",
                 *runner_args]
    if settings.gpus == 0 and not any(a == "--devices" or a.startswith("--devices=")
                                      for a in runner_args):
        arguments += ["--devices", "cpu"]
    fields = {
        "job_name": f"vtab-{stamp}",
        "sbatch_lines": "\n".join(sbatch_lines(settings, output)),
        "workdir": shlex.quote(workdir),
        "setup": "\n".join(settings.setup) or "# no setup lines (setup: [])",
        "python": shlex.quote(python),
        "runner": shlex.quote(str(REPO / "main_runner.py")),
        "runner_args": " ".join(map(shlex.quote, arguments)),
        "requeue": _requeue_block(settings, shlex.quote(python), work_area),
    }
    try:
        return string.Template(text).substitute(fields)
    except (KeyError, ValueError) as exc:
        raise ConfigError("template", f"{template}: {type(exc).__name__} {exc} (fields: "
                                      f"{', '.join(sorted(fields))}; write $$ for a $)") from None


def submit(script: Path) -> str:
    """Submit `script` with one sbatch call; the job id. VtabError with SLURM's own message."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise VtabError("sbatch is not on PATH: this machine cannot submit to SLURM (the "
                        f"script is kept in {script}; --dry_run prints it)")
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        raise VtabError(f"sbatch refused {script}: {said}")
    return done.stdout.strip().split(";")[0]


def work_left(area: WorkArea) -> bool:
    """Whether jobs are queued, running or waiting (a requeued job would find work)."""
    return bool(area.queued() or area.listing(RUNNING) or area.listing(WAITING))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main_sbatch_runner.py",
        description="Submit vtab runners to SLURM: one sbatch call, a job array of --array "
                    "jobs, each running one runner per granted GPU on --work_area. Arguments "
                    "not listed here are handed to the runners (main_runner.py).")
    parser.add_argument("--work_area", type=Path, default=Path("./work"),
                        help="the shared work area (default: ./work)")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"defaults (default: ./{DEFAULT_CONFIG} when it exists)")
    for name, kind, text in (
            ("gpus", int, "GPUs per job (0: CPU runners, with --devices cpu,...)"),
            ("time", str, "time limit per job ([days-]hh:mm:ss)"),
            ("account", str, "SLURM account"), ("qos", str, "SLURM quality of service"),
            ("partition", str, "SLURM partition"), ("array", int, "how many jobs"),
            ("cpus_per_gpu", int, "CPUs per GPU"), ("cpus", int, "CPUs per CPU-only job"),
            ("mem", str, "memory per job (64G)"),
            ("signal_seconds", int, "warning signal this long before the time limit"),
            ("max_requeues", int, "with --requeue: at most this many requeues"),
            ("idle_limit", float, "a runner exits after this many idle seconds")):
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    parser.add_argument("--requeue", action="store_true", default=None,
                        help="a job stopped by the warning signal requeues itself while work "
                             "remains")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the script and submit nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, runner_args = parser.parse_known_args(argv)
    options = {k: v for k, v in vars(args).items()
               if k not in ("work_area", "config", "dry_run")}
    try:
        settings = resolve(load_config(args.config), options,
                           str(args.config or DEFAULT_CONFIG))
        workdir = settings.workdir or os.getcwd()
        python = settings.python or sys.executable
        work_area = str(Path(workdir, args.work_area).absolute())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        script = render(settings, runner_args, workdir=workdir, python=python,
                        work_area=work_area, stamp=stamp)
    except VtabError as exc:
        print(f"main_sbatch_runner: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(script, end="")
        return 0
    folder = Path(workdir, settings.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"vtab-{stamp}.sh"
    path.write_text(script)
    try:
        job = submit(path)
    except VtabError as exc:
        print(f"main_sbatch_runner: {exc}", file=sys.stderr)
        return 1
    jobs = f"job {job} (array 0-{settings.array - 1})" if settings.array > 1 else f"job {job}"
    per_job = f"{settings.gpus} GPU" if settings.gpus else "CPU runners"
    print(f"submitted {jobs}: {settings.array} job(s) x {per_job}, each runs one runner per "
          f"granted GPU on {work_area}; script {path}, logs {folder}/")
    return 0


def _pending_main(argv: list[str]) -> int:
    """``python -m vtab.launch.slurm --pending AREA``: exit 0 when work is left there."""
    return 0 if work_left(WorkArea(Path(argv[1]))) else 1


if __name__ == "__main__":
    sys.exit(_pending_main(sys.argv[1:]) if sys.argv[1:2] == ["--pending"] else main())
