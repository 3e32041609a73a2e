"""The Jinja2 environment the pages render with, and the formatting filters they share."""

from __future__ import annotations

import time
from pathlib import Path

import jinja2

__all__ = ["environment", "fmt_count", "fmt_duration", "fmt_time"]

_TEMPLATES = Path(__file__).parent / "templates"


def fmt_time(ts: float | None) -> str:
    """A Unix time as UTC `2026-12-07 14:03:09`, or an em dash when there is none."""
    if ts is None:
        return "\u2014"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def fmt_duration(seconds: float | None) -> str:
    """`42 s`, `3 min 05 s`, `2 h 07 min`; an em dash for None."""
    if seconds is None:
        return "\u2014"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_count(n: float | None) -> str:
    """A count with thousands separators (`12,345`), one decimal below 100 when fractional."""
    if n is None:
        return "\u2014"
    if isinstance(n, float) and not n.is_integer() and abs(n) < 100:
        return f"{n:,.1f}"
    return f"{round(n):,}"


def environment(*extra: Path) -> jinja2.Environment:
    """Templates from `extra` folders first, then the shared ones (`base.html`, `macros.html`).

    Autoescaped: every value a tenant controls (file names, metadata, error messages) is text.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*extra, _TEMPLATES]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(time=fmt_time, duration=fmt_duration, count=fmt_count)
    return env
