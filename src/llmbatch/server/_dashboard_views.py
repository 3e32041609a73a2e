"""What the dashboard's pages show of a batch and of the engine, computed from the store, the
batch's files and the in-memory history; the templates only lay it out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from ..ui import Series, line_chart
from ._state import ServerState
from ._store import TERMINAL, BatchRow
from ._worker import files_dir

__all__ = ["BatchView", "batch_chart", "engine_panel", "error_lines"]

#: Error lines shown on a batch page: enough to see the pattern; the file has them all.
MAX_ERROR_LINES = 20
_ERROR_READ_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class BatchView:
    """A batch as a row of the table and the head of its page."""

    b: BatchRow

    @property
    def finished_at(self) -> int | None:
        b = self.b
        return b.completed_at or b.failed_at or b.expired_at or b.cancelled_at

    @property
    def active(self) -> bool:
        return self.b.status not in TERMINAL

    @property
    def rows_per_second(self) -> float | None:
        """Rows answered per second since the batch started running (to its end, once ended)."""
        b = self.b
        if b.in_progress_at is None:
            return None
        end = b.finalizing_at or self.finished_at or time.time()
        elapsed = max(end - b.in_progress_at, 1)
        return (b.completed + b.failed) / elapsed

    @property
    def cancellable(self) -> bool:
        return self.b.status in ("validating", "in_progress")


def batch_chart(srv: ServerState, b: BatchRow) -> Any:
    """Completed and failed rows over the batch's run, seconds from its start: the samples the
    worker took while it ran, framed by its start (0 rows) and, once it ended, its final counts."""
    start = b.in_progress_at or b.created_at
    points = [(float(start), 0, 0)] if b.in_progress_at is not None else []
    points += [p for p in srv.history.samples(b.id) if p[0] >= start]
    end = BatchView(b).finished_at or (time.time() if b.status == "in_progress" else None)
    if end is not None and b.in_progress_at is not None:
        # Status times are whole seconds, samples are not: the last point never goes back in time.
        points.append((max(float(end), points[-1][0]), b.completed, b.failed))
    done = [(t - start, float(c)) for t, c, _ in points]
    failed = [(t - start, float(f)) for t, _, f in points]
    return line_chart(
        [Series("completed", "#16a34a", done), Series("failed", "#dc2626", failed)],
        x_label=f"seconds since start (0 to {done[-1][0]:.0f})" if done else "seconds since start",
        title=f"Rows of {b.id} over time",
    )


def error_lines(srv: ServerState, b: BatchRow) -> list[dict[str, Any]]:
    """The first lines of the batch's error file: custom_id, HTTP status, error code and message."""
    if not b.error_file_id:
        return []
    path = files_dir(srv.config) / b.error_file_id
    try:
        with open(path, "rb") as f:
            head = f.read(_ERROR_READ_BYTES)
    except OSError:
        return []
    out = []
    for raw in head.split(b"\n")[:MAX_ERROR_LINES]:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # the last, cut-off line of a long head
        response = line.get("response") or {}
        error = line.get("error") or ((response.get("body") or {}).get("error") if response else None) or {}
        out.append(
            {
                "custom_id": line.get("custom_id"),
                "status": response.get("status_code"),
                "code": error.get("code") or error.get("type"),
                "message": error.get("message") or "",
            }
        )
    return out


async def engine_panel(srv: ServerState) -> dict[str, Any]:
    """The engine, what it serves and its load: the same for every viewer (no tenant's objects)."""
    health = srv.engine.health()
    models = await srv.engine.list_models()
    rates = srv.meter.rates
    series = rates.series()
    now = series[-1][0] if series else time.time()
    # Rows/s and tokens/s differ by 100x or more: each gets its own axis, or one line is flat.
    charts = [
        line_chart(
            [Series(label, color, [(t - now, point[i]) for t, *point in series])],
            height=150,
            x_label="seconds, last 10 minutes",
            title=f"Engine {label}",
        )
        for i, (label, color) in enumerate([("rows/s", "#16a34a"), ("tokens/s", "#2563eb")])
    ]
    return {
        "engine": srv.engine.name,
        "executor": srv.config.executor,
        "models": [m.get("id") for m in models if not m.get("parent")],
        "adapters": [(m.get("id"), m.get("parent")) for m in models if m.get("parent")],
        "in_flight_batch": srv.meter.in_flight["batch"],
        "in_flight_direct": srv.meter.in_flight["direct"],
        "capacity": srv.engine.max_concurrency,
        "queued": srv.store.rows_pending() if srv.store is not None else 0,
        "rate_1m": rates.per_second(60),
        "rate_5m": rates.per_second(300),
        "charts": charts,
        "replicas": health.get("replicas"),
        "uptime": time.time() - srv.started_at,
    }
