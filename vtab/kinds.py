"""Job kinds: what a ``hyperparams`` stage runs, registered by name with the schema it reads."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from vtab.devices import environment_failure
from vtab.errors import Advice, ConfigError, RunnerEnvironmentError
from vtab.evaluation.schemas import LinearProbeConfig
from vtab.fsutil import append_line
from vtab.pipeline import StageContext, register_kind
from vtab.schema import Field, Section


def _inspect_linear_probe(config: LinearProbeConfig) -> list[ConfigError | Advice]:
    return _import_probe().inspect(config)


def _complete_linear_probe(config: LinearProbeConfig, device: str) -> LinearProbeConfig:
    return _import_probe().complete_config(config, device)


@register_kind("linear_probe", LinearProbeConfig, inspect=_inspect_linear_probe,
               complete=_complete_linear_probe)
def linear_probe(config: LinearProbeConfig, ctx: StageContext) -> dict[str, Any]:
    """Frozen backbone features (cached) of one or more layers, and a head trained on each."""
    _check_trusted(config, ctx.trusted_modules)
    probe = _import_probe()
    try:
        return probe.run_linear_probe(
            config, cache_dir=ctx.features_cache(), device=ctx.device,
            num_workers=ctx.num_workers, progress=ctx.progress, outputs_dir=ctx.outputs_dir())
    except Exception as exc:
        reason = environment_failure(exc)
        if reason is None:
            raise
        raise RunnerEnvironmentError(f"{reason} ({type(exc).__name__}: {exc})") from exc


def _check_trusted(config: LinearProbeConfig, trusted: tuple[str, ...]) -> None:
    """A module backbone runs a function the job names: only from modules the runner trusts."""
    if config.backbone.source != "module":
        return
    module = config.backbone.name.split(":")[0]
    if not any(module == prefix or module.startswith(prefix + ".") for prefix in trusted):
        raise ConfigError("backbone.name", f"{config.backbone.name!r} runs code from module "
                                           f"{module}, which this runner does not trust: start "
                                           "it with --module_backbones naming that module (or "
                                           f"a package above it); trusted now: "
                                           f"{', '.join(trusted) or 'none'}")


def _import_probe() -> ModuleType:
    """Import the evaluation engine (and torch) only when a job needs it."""
    try:
        from vtab.evaluation import probe
    except (ImportError, RuntimeError) as exc:
        raise RunnerEnvironmentError(
            f"the evaluation engine cannot be imported: {type(exc).__name__}: {exc}. If it "
            "says 'operator torchvision::nms does not exist', torch and torchvision are builds "
            "that do not match: reinstall both in one command without an exact torch pin "
            "(see SETUP_ENV.md).") from exc
    return probe


LOG_DIR = "VTAB_SLEEP_LOG_DIR"  # where the runner's operator lets sleep jobs append their logs


class SleepSettings(Section):
    seconds: float = Field(0.0, ge=0, le=86_400, description="how long the job waits")
    log: str = Field("", description="a file to which the job appends its id and process id "
                                     "when its body completes (shows whether a job ran twice); "
                                     f"only inside the folder the runner's {LOG_DIR} names")
    result: float = Field(0.0, description="the result the job reports")


class SleepConfig(Section):
    """What the ``sleep`` job kind reads: a job that only waits, for testing work areas."""

    sleep: SleepSettings = Field(SleepSettings(), description="what the job does")
    dataset: str = Field("", description="a label that summarize groups by; recorded only")
    seed: int = Field(0, description="a label that aggregate groups by; recorded only")
    metric: str = Field("top1", description="the name under which metrics holds the result")


def _sleep_log(config: SleepConfig) -> Path | None:
    """The log file a sleep job may append to: a job chooses the name, the runner's operator the
    folder, so that no job can make a runner write where it likes."""
    if not config.sleep.log:
        return None
    allowed = os.environ.get(LOG_DIR)
    path = Path(config.sleep.log)
    if not allowed or not path.resolve().is_relative_to(Path(allowed).resolve()):
        raise ConfigError("sleep.log", f"{config.sleep.log!r} is not inside the folder that "
                                       f"{LOG_DIR} names ({allowed or 'unset'}): a job may "
                                       "write only where the runner's operator allows")
    return path


def _inspect_sleep(config: SleepConfig) -> list[ConfigError | Advice]:
    try:
        _sleep_log(config)
    except ConfigError as exc:
        return [exc]
    return []


@register_kind("sleep", SleepConfig, inspect=_inspect_sleep)
def sleep(config: SleepConfig, ctx: StageContext) -> dict[str, Any]:
    """A job that only waits: for testing the work area and measuring queue overhead."""
    log = _sleep_log(config)
    time.sleep(config.sleep.seconds)
    if log is not None:
        append_line(log, f"{ctx.job['id']} {os.getpid()}")
    return {"result": config.sleep.result, "metrics": {config.metric: config.sleep.result}}
