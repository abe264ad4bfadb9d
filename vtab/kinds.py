"""Job kinds: what a ``hyperparams`` stage runs, registered by name with the schema it reads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from vtab.devices import environment_failure
from vtab.errors import Advice, ConfigError, RunnerEnvironmentError
from vtab.evaluation.schemas import LinearProbeConfig
from vtab.fsutil import append_line
from vtab.outcome import RunOutcome
from vtab.pipeline import RunMany, StageContext, register_kind
from vtab.schema import Field, Section


def _import_probe() -> ModuleType:
    """Import the evaluation engine (and torch) only when a job needs it, or will soon (an
    idle runner warming up while another forks the jobs it may claim)."""
    try:
        from vtab.evaluation import probe
    except (ImportError, RuntimeError) as exc:
        raise RunnerEnvironmentError(
            f"the evaluation engine cannot be imported: {type(exc).__name__}: {exc}. If it "
            "says 'operator torchvision::nms does not exist', torch and torchvision are builds "
            "that do not match: reinstall both in one command without an exact torch pin "
            "(see SETUP_ENV.md).") from exc
    return probe


def _inspect_linear_probe(config: LinearProbeConfig) -> list[ConfigError | Advice]:
    return _import_probe().inspect(config)


def _complete_linear_probe(config: LinearProbeConfig, device: str) -> LinearProbeConfig:
    return _import_probe().complete_config(config, device)


def _linear_probe_batch_key(config: LinearProbeConfig) -> str | None:
    return _import_probe().batch_key(config)


def _linear_probes(configs: list[LinearProbeConfig],
                   ctxs: list[StageContext]) -> list[RunOutcome | Exception]:
    """Siblings' probes in one pass: features loaded once, every head trained together."""
    outputs: list[RunOutcome | Exception | None] = [None] * len(configs)
    trusted = []
    for i, (config, ctx) in enumerate(zip(configs, ctxs, strict=True)):
        try:
            _check_trusted(config, ctx.trusted_modules)
            trusted.append(i)
        except ConfigError as exc:
            outputs[i] = exc
    if trusted:
        ctx = ctxs[trusted[0]]  # one runner's contexts: the same device, cache and workers
        try:
            found = _import_probe().run_linear_probes(
                [configs[i] for i in trusted], cache_dir=ctx.features_cache(),
                device=ctx.device, num_workers=ctx.num_workers, progress=ctx.progress,
                outputs_dirs=[ctxs[i].outputs_dir() for i in trusted])
        except Exception as exc:
            reason = environment_failure(exc)
            if reason is None:
                raise
            raise RunnerEnvironmentError(f"{reason} ({type(exc).__name__}: {exc})") from exc
        for i, output in zip(trusted, found, strict=True):
            reason = environment_failure(output) if isinstance(output, Exception) else None
            if reason is not None:  # the device failed while scoring: the runner's fault
                raise RunnerEnvironmentError(f"{reason} ({type(output).__name__}: {output})")
            outputs[i] = output if isinstance(output, Exception) else RunOutcome.of(output)
    return outputs  # every config has its output or its error


def _one(run_many: RunMany, config: Any, ctx: StageContext) -> RunOutcome:
    """A kind's single run: its `run_many` with one config."""
    (output,) = run_many([config], [ctx])
    if isinstance(output, Exception):
        raise output
    return output


@register_kind("linear_probe", LinearProbeConfig, inspect=_inspect_linear_probe,
               complete=_complete_linear_probe, batch_key=_linear_probe_batch_key,
               run_many=_linear_probes, warm=_import_probe)
def linear_probe(config: LinearProbeConfig, ctx: StageContext) -> RunOutcome:
    """Frozen backbone features (cached) of one or more layers, and a head trained on each."""
    return _one(_linear_probes, config, ctx)


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


LOG_DIR = "VTAB_SLEEP_LOG_DIR"  # where the runner's operator lets sleep jobs append their logs


class SleepSettings(Section):
    seconds: float = Field(0.0, ge=0, le=86_400, description="how long the job waits")
    log: str = Field("", description="a file to which the job appends its id and process id "
                                     "when its body completes (shows whether a job ran twice); "
                                     f"only inside the folder the runner's {LOG_DIR} names")
    result: float = Field(0.0, description="the result the job reports")
    batch: bool = Field(False, description="sibling jobs with equal settings but their "
                                           "result, seed and log wait together, in one pass "
                                           "(for testing batches)")


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


def _sleep_batch_key(config: SleepConfig) -> str | None:
    if not config.sleep.batch:
        return None
    shared = config.model_dump(mode="json")
    shared.pop("seed")
    for key in ("result", "log"):
        shared["sleep"].pop(key)
    return json.dumps(shared, sort_keys=True)


def _sleeps(configs: list[SleepConfig],
            ctxs: list[StageContext]) -> list[RunOutcome | Exception]:
    """Wait once for every job, then each logs and reports its own result."""
    logs: list[Path | Exception | None] = []
    for config in configs:
        try:
            logs.append(_sleep_log(config))
        except ConfigError as exc:
            logs.append(exc)
    time.sleep(max(config.sleep.seconds for config in configs))
    outputs: list[RunOutcome | Exception] = []
    for config, ctx, log in zip(configs, ctxs, logs, strict=True):
        if isinstance(log, Exception):
            outputs.append(log)
            continue
        try:
            if log is not None:
                append_line(log, f"{ctx.job['id']} {os.getpid()}")
        except OSError as exc:  # this job's own failure (a log that is a folder, say)
            outputs.append(exc)
            continue
        outputs.append(RunOutcome({"result": config.sleep.result,
                                   "metrics": {config.metric: config.sleep.result}}))
    return outputs


@register_kind("sleep", SleepConfig, inspect=_inspect_sleep, batch_key=_sleep_batch_key,
               run_many=_sleeps)
def sleep(config: SleepConfig, ctx: StageContext) -> RunOutcome:
    """A job that only waits: for testing the work area and measuring queue overhead."""
    return _one(_sleeps, config, ctx)
