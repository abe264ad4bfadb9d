"""Errors that name what a user must fix: the file and the key."""

from __future__ import annotations


class VtabError(Exception):
    """Base class for errors caused by a job's input rather than by a bug."""


class ConfigError(VtabError):
    """A value in a job or pipeline is missing, of the wrong type or out of range.

    `key` is the dotted path of the offending entry (``optim.lr``); `file` is set
    by whoever knows which yaml the value came from.
    """

    def __init__(self, key: str, message: str, file: str | None = None) -> None:
        self.key = key
        self.message = message
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}key '{self.key}': {self.message}"

    def in_file(self, file: str) -> ConfigError:
        """Return a copy that names `file` (keeps an already named file)."""
        return ConfigError(self.key, self.message, self.file or file)


class DataError(VtabError):
    """A dataset folder, split file or image is missing or malformed."""


class RunnerEnvironmentError(Exception):
    """This runner's installation cannot run the job (a broken torch, say).

    Not the job's fault: the runner returns the job to the queue and stops,
    instead of crashing every job it would claim.
    """
