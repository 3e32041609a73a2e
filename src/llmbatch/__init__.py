"""llmbatch: run large numbers of LLM requests cheaply and reliably."""

from __future__ import annotations

from typing import Any

from ._exceptions import (
    BudgetExceeded,
    ConfigError,
    DamagedJob,
    DamagedResults,
    EngineError,
    EngineUnavailable,
    InputError,
    InvalidRows,
    JobBusy,
    LLMBatchError,
    ProviderError,
    StateError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LLMBatchError",
    "ConfigError",
    "InputError",
    "InvalidRows",
    "JobBusy",
    "EngineError",
    "EngineUnavailable",
    "StateError",
    "DamagedJob",
    "DamagedResults",
    "ProviderError",
    "BudgetExceeded",
    # the Python API (llmbatch.api), imported on first use so the CLI starts fast
    "AsyncBatchClient",
    "BatchClient",
    "BatchConfig",
    "Task",
    "TaskReport",
    "Job",
    "JobStatus",
    "run_file",
]

_API = {"AsyncBatchClient", "BatchClient", "BatchConfig", "Task", "TaskReport", "Job", "JobStatus", "run_file"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'llmbatch' has no attribute {name!r}")
