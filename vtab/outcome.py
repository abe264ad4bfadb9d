"""The shape of what a job kind's run yields, as a finished job records it.

A run's *scores* are what processors and results tables read, at the top level of the job:
``result`` (the primary metric, a fraction), ``metrics``, ``per_class`` and, for a head fitted
to convergence or a layer of known width, ``head_info`` and ``feature_dim``; or ``variants``,
one such block per (layer, head variant). Everything else a kind says about the run (sizes,
timings, the features it used, what the backbone loaded) is its *report*, kept under
``report:``, so that no key of a kind lands beside the job's own keys (a kind's ``backbone``
beside ``config.backbone``). The files a run writes are its *artefacts*: the work area decides
where they live (vtab/workarea.py) and the job lists them under ``artefacts:``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SCORE_KEYS = ("result", "metrics", "per_class", "head_info", "feature_dim", "variants")


@dataclass(frozen=True)
class RunOutcome:
    """A run's scores and its report (plain YAML values)."""

    scores: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.scores) - set(SCORE_KEYS))
        if unknown or not ("result" in self.scores or "variants" in self.scores):
            raise ValueError(f"scores hold result or variants, and only {', '.join(SCORE_KEYS)};"
                             f" got {', '.join(sorted(self.scores))}")

    @classmethod
    def of(cls, output: Mapping[str, Any]) -> RunOutcome:
        """A kind's flat output split into scores and report."""
        return cls({k: v for k, v in output.items() if k in SCORE_KEYS},
                   {k: v for k, v in output.items() if k not in SCORE_KEYS})


def has_scores(job: Mapping[str, Any]) -> bool:
    return "result" in job or "variants" in job
