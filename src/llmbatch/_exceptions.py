"""llmbatch's one error hierarchy.

    LLMBatchError                 base of every error llmbatch raises on purpose
    +-- ConfigError               bad flags, settings or environment; the message says the fix
    |   +-- JobBusy               another process (or run) holds the job's lock
    |   +-- EngineUnavailable     this machine lacks what an engine runs on (its library, a GPU)
    +-- InputError                bad user input (a file, a line, a value); names where and why
    |   +-- InvalidRows           a job's input has invalid rows and skip_invalid is off
    +-- EngineError               an engine could not be created or started
    +-- StateError                a stored object is not in a state that allows the operation
    |   +-- DamagedJob            a job's files (its store, its lock) are damaged or not what they should be
    |   +-- DamagedResults        result files a job's rows point into are missing, cut or changed
    +-- ProviderError             a provider's API refused or failed a call (status, body)
    +-- BudgetExceeded            the next submission would pass --max-cost

The CLI turns any of these into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

__all__ = [
    "LLMBatchError",
    "ConfigError",
    "JobBusy",
    "EngineUnavailable",
    "InputError",
    "InvalidRows",
    "EngineError",
    "StateError",
    "DamagedJob",
    "DamagedResults",
    "ProviderError",
    "BudgetExceeded",
]


class LLMBatchError(Exception):
    """Base class of every error llmbatch raises on purpose."""


class ConfigError(LLMBatchError):
    """A flag, setting or environment variable is missing or invalid."""


class JobBusy(ConfigError):
    """Another process, or another run in this one, is running the job (holds its lock)."""


class EngineUnavailable(ConfigError):
    """This machine lacks what the engine runs on (its library, a GPU); the options themselves may
    be fine. The Ray executor's API process then lets a replica describe the engine instead."""


class InputError(LLMBatchError):
    """User input is invalid; the message names the file, line and reason where known."""


class InvalidRows(InputError):
    """A job's inputs have invalid rows, so nothing was sent. `count` rows are invalid;
    `problems` names the first few as `FILE:LINE: code: reason`."""

    def __init__(self, message: str, *, count: int, problems: list[str]) -> None:
        super().__init__(message)
        self.count = count
        self.problems = problems


class EngineError(LLMBatchError):
    """An engine could not be created or started."""


class StateError(LLMBatchError):
    """A stored object is not in a state that allows the requested transition."""


class DamagedJob(StateError):
    """A job's own files are damaged (its SQLite store cut or overwritten, its lock file not a
    file); the message names the job, the file and what to do."""


class DamagedResults(StateError):
    """Downloaded result files that a job's rows point into are missing, shorter or different
    from when they were downloaded, so nothing was exported. `files` maps each damaged file's
    path to what is wrong with it; the message says how to get it back."""

    def __init__(self, message: str, *, files: dict[str, str]) -> None:
        super().__init__(message)
        self.files = files


class ProviderError(LLMBatchError):
    """A provider's API refused or failed a call. `status` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, *, status: int | None = None, body: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def retryable(self) -> bool:
        """Rate limits, server trouble and lost connections are worth another try later."""
        return self.status is None or self.status in (408, 409, 429) or self.status >= 500


class BudgetExceeded(LLMBatchError):
    """Submitting the next chunk would take the job's estimated spend past its cap."""
