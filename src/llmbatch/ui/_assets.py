"""The pages' static files (htmx, the stylesheet), served from the package."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response

__all__ = ["ASSETS", "asset_response"]

_DIR = Path(__file__).parent / "static"

#: Name -> media type of every file a page may load. Nothing else under static/ is served.
ASSETS = {
    "htmx.min.js": "text/javascript; charset=utf-8",
    "htmx.LICENSE.txt": "text/plain; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def asset_response(name: str) -> Response | None:
    """The asset as a response, or None when `name` is not one. The files change only with the
    package, so browsers may keep them an hour (pages link them with the version in the URL)."""
    media = ASSETS.get(name)
    if media is None:
        return None
    return Response((_DIR / name).read_bytes(), media_type=media, headers={"Cache-Control": "public, max-age=3600"})
