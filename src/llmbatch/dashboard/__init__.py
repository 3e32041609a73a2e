"""The local jobs dashboard (`llmbatch dashboard`): read-only web pages over the jobs in
`$LLMBATCH_HOME/jobs`, rendered with `llmbatch.ui`. It opens each job's store read-only for the
moment of a read, so a job that `llmbatch run` is running is never blocked or changed."""

from __future__ import annotations

from ._app import LOOPBACK_HOSTS, create_app
from ._read import JobView, commands_for, job_dirs, read_job

__all__ = ["LOOPBACK_HOSTS", "JobView", "commands_for", "create_app", "job_dirs", "read_job"]
