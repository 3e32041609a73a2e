"""Line charts as inline SVG: a few series over time, drawn on the server (no chart library)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from ._render import fmt_count

__all__ = ["Series", "line_chart"]


@dataclass(frozen=True, slots=True)
class Series:
    """One line: its legend label, CSS colour and (x, y) points, x ascending."""

    label: str
    color: str
    points: Sequence[tuple[float, float]]


def _path(points: Sequence[tuple[float, float]], sx: float, sy: float, x0: float, left: float, bottom: float) -> str:
    return " ".join(
        f"{'M' if i == 0 else 'L'}{left + (x - x0) * sx:.1f},{bottom - y * sy:.1f}" for i, (x, y) in enumerate(points)
    )


def line_chart(
    series: Sequence[Series], *, width: int = 640, height: int = 180, x_label: str = "", title: str = ""
) -> Markup:
    """An SVG of `series` on shared axes (y from 0), with a legend; `x` is usually seconds.

    Empty series draw an empty frame with "no data yet", so a page's layout does not jump
    when the first points arrive.
    """
    pad = 28.0
    left = 60.0  # room for the y axis' largest value ("1,234,567")
    plot_w, plot_h = width - left - pad / 2, height - 1.5 * pad
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>" if title else "",
        f'<rect x="{left}" y="{pad / 2}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    if not xs:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">no data yet</text>')
    else:
        x0, x1 = min(xs), max(xs)
        top = max(ys) or 1.0
        sx = plot_w / ((x1 - x0) or 1.0)
        sy = plot_h / top
        parts.append(f'<text x="{left - 4}" y="{pad / 2 + 10}" text-anchor="end" class="axis">{fmt_count(top)}</text>')
        parts.append(f'<text x="{left - 4}" y="{height - pad}" text-anchor="end" class="axis">0</text>')
        if x_label:
            parts.append(
                f'<text x="{width - pad / 2}" y="{height - 6}" text-anchor="end" class="axis">{escape(x_label)}</text>'
            )
        for s in series:
            if s.points:
                d = _path(s.points, sx, sy, x0, left, height - pad)
                parts.append(f'<path d="{d}" fill="none" stroke="{escape(s.color)}" stroke-width="2"/>')
    for i, s in enumerate(series):
        x = left + 8 + i * 170
        parts.append(f'<rect x="{x}" y="{height - 14}" width="10" height="10" fill="{escape(s.color)}"/>')
        last = fmt_count(s.points[-1][1]) if s.points else "0"
        parts.append(f'<text x="{x + 14}" y="{height - 5}" class="legend">{escape(s.label)}: {last}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
