"""Crash points for chaos testing.

With ``VTAB_CRASH_PROBABILITY`` set (say 0.01), a process kills itself with
SIGKILL at each step of the work-area protocol with that probability: in the
middle of claims, writes, moves and stage transitions, where a random kill from
outside rarely lands. Unset (the default), a crash point costs one comparison.
"""

from __future__ import annotations

import os
import random
import signal

_PROBABILITY = float(os.environ.get("VTAB_CRASH_PROBABILITY") or 0.0)


def crash_point() -> None:
    if _PROBABILITY and random.random() < _PROBABILITY:
        os.kill(os.getpid(), signal.SIGKILL)
