"""Job kinds: what a ``hyperparams`` stage runs, registered by name."""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any

from vtab.config import number, typed
from vtab.errors import RunnerEnvironmentError
from vtab.fsutil import append_line
from vtab.pipeline import StageContext, register_kind


def _check_linear_probe(config: dict[str, Any]) -> None:
    _import_probe().check_config(config)


@register_kind("linear_probe", check=_check_linear_probe)
def linear_probe(config: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Frozen backbone features (cached) and a linear head trained on them."""
    return _import_probe().run_linear_probe(
        config, cache_dir=ctx.features_cache(), device=ctx.device, num_workers=ctx.num_workers,
        progress=ctx.progress, outputs_dir=ctx.outputs_dir())


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


@register_kind("sleep")
def sleep(config: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """A job that only waits: for testing the work area and measuring queue overhead.

    ``sleep.seconds`` is the wait; ``sleep.log``, when set, is a file to which
    the job appends one line when its body completes (an execution log that
    shows whether a job ran twice); ``sleep.result`` is the result it reports.
    """
    time.sleep(number(config, "sleep.seconds", 0.0, minimum=0.0))
    log = typed(config, "sleep.log", str, "")
    if log:
        append_line(log, f"{ctx.job['id']} {os.getpid()}")
    return {"result": number(config, "sleep.result", 0.0), "metrics": {}}
