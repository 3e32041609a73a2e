"""A job's charts: rows done and spend over time, from the steps of its event log."""

from __future__ import annotations

import time

from markupsafe import Markup

from ..ui import Series, line_chart
from ._read import JobView

__all__ = ["rows_chart", "spend_chart"]


def _scale(span: float) -> tuple[float, str]:
    """Seconds per unit of the x axis and its name, so that a job of days reads in hours."""
    if span > 3 * 3600:
        return 3600.0, "hours"
    if span > 3 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _cumulative(view: JobView) -> tuple[list[tuple[float, int, int, float]], float, str]:
    """(x, succeeded, failed, spent) points from the job's creation (x = 0, nothing done) to its
    last step, or to now while it runs; the x unit's seconds and name."""
    start = float(view.created_at)
    points = [(start, 0, 0, 0.0)]
    ok = bad = 0
    cost = 0.0
    for at, s, f, c in view.steps:
        ok, bad, cost = ok + s, bad + f, cost + c
        points.append((max(at, start), ok, bad, cost))
    if view.running:
        points.append((max(time.time(), points[-1][0]), ok, bad, cost))
    unit, name = _scale(points[-1][0] - start)
    return [((t - start) / unit, s, f, c) for t, s, f, c in points], unit, name


def _x_label(points: list[tuple[float, int, int, float]], name: str) -> str:
    return f"{name} since created (0 to {points[-1][0]:.3g})"


def rows_chart(view: JobView) -> Markup:
    """Rows succeeded and failed over the job's life (invalid rows count as failed at its creation)."""
    points, _unit, name = _cumulative(view)
    return line_chart(
        [
            Series("succeeded", "#16a34a", [(x, float(s)) for x, s, _, _ in points]),
            Series("failed", "#dc2626", [(x, float(f)) for x, _, f, _ in points]),
        ],
        x_label=_x_label(points, name),
        title=f"Rows of {view.id} over time",
    )


def spend_chart(view: JobView) -> Markup:
    """Spend (USD, in cents on the axis so small jobs read) over time, with the cap and the
    estimate as flat lines where there are ones."""
    points, _unit, name = _cumulative(view)
    end = points[-1][0]
    series = [Series("spent (\u00a2)", "#2563eb", [(x, 100 * c) for x, _, _, c in points])]
    if view.estimate:
        series.append(Series("estimate (\u00a2)", "#6b7280", [(0.0, 100 * view.estimate), (end, 100 * view.estimate)]))
    if view.cap is not None:
        series.append(Series("--max-cost (\u00a2)", "#d97706", [(0.0, 100 * view.cap), (end, 100 * view.cap)]))
    return line_chart(series, height=160, x_label=_x_label(points, name), title=f"Spend of {view.id} over time")
