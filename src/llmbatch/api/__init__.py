"""llmbatch from Python: batching clients for ordinary calls, and job handles."""

from __future__ import annotations

from ._client import AsyncBatchClient, BatchClient, BatchConfig
from ._jobs import Job, JobStatus, run_file
from ._task import Task, TaskReport, TaskRow, response_format_for

__all__ = [
    "AsyncBatchClient",
    "BatchClient",
    "BatchConfig",
    "Job",
    "JobStatus",
    "Task",
    "TaskReport",
    "TaskRow",
    "response_format_for",
    "run_file",
]
