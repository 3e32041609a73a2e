"""What llmbatch's web pages share: the base template, the vendored htmx, the stylesheet and
an SVG line chart. The server's dashboard (`llmbatch serve`, at /ui) renders with it; so can a
local one. No build step and no CDN: the pages are rendered on the server, htmx (vendored,
0BSD) refreshes parts of them, and charts are inline SVG.
"""

from __future__ import annotations

from ._assets import ASSETS, asset_response
from ._charts import Series, line_chart
from ._render import environment, fmt_count, fmt_duration, fmt_time

__all__ = [
    "ASSETS",
    "Series",
    "asset_response",
    "environment",
    "fmt_count",
    "fmt_duration",
    "fmt_time",
    "line_chart",
]
