"""What the entry points share."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

PRINTS_A_LOT = """
from vtab import cli

def main() -> int:
    for index in range(100_000):
        print(f"line {index} of a long table")
    return 0

cli.run(main)
"""


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PRINTS_A_LOT], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"line 0 of a long table\n"
    proc.stdout.close()  # as `| head -1` does
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""
