"""The server's dashboard: web pages at /ui over the same store, files and key checks as the API.

- `/ui`: the caller's batches, newest first, by status, 50 a page, and the engine panel;
- `/ui/batches/{id}`: one batch: counts over time, its first errors, its files, a cancel button;
- `/ui/login`: asks for a key when the server has keys (see `_dashboard_auth`).

Parts of each page refresh themselves every 2 s through htmx (vendored in `llmbatch.ui`) from
the `/ui/fragments/...` routes, which render the same templates' parts; a finished batch's page
stops refreshing. Everything a tenant wrote (file names, metadata, messages) is autoescaped.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from .. import __version__
from ..ui import asset_response, environment
from . import _batches
from ._dashboard_auth import COOKIE, LoginNeeded, Viewer, check_csrf, csrf_token, viewer
from ._dashboard_views import BatchView, batch_chart, engine_panel, error_lines
from ._errors import APIError
from ._files import _FileResponse
from ._state import ServerState, server_state
from ._store import TIMESTAMP_OF
from ._worker import files_dir

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

_env = environment()
#: Batches on one page of the table.
PAGE_SIZE = 50
#: How long a browser keeps the key it signed in with (a week), unless it signs out.
_COOKIE_SECONDS = 7 * 24 * 3600
_STATUSES = tuple(TIMESTAMP_OF)


def _html(request: Request, template: str, http_status: int = 200, **context: Any) -> HTMLResponse:
    srv = server_state(request)
    base = {"static": "/ui/static", "home": "/ui", "version": __version__, "has_keys": srv.has_keys, "who": None}
    html = _env.get_template(template).render({**base, **context})
    # No caching of pages (they show one key's objects), and no framing by other sites.
    headers = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}
    return HTMLResponse(html, status_code=http_status, headers=headers)


def _guarded(request: Request) -> Viewer | Response:
    """The viewer, or the answer for a caller who is not one: the sign-in page (htmx: told to go
    there), or 401 for a wrong Bearer key."""
    try:
        return viewer(request)
    except LoginNeeded as exc:
        target = "/ui/login?next=" + quote(request.url.path) + (f"&why={quote(exc.why)}" if exc.why else "")
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, status_code=303)
    except APIError as exc:
        return _html(request, "server/error.html", exc.status, message=str(exc))


def _context(request: Request, who: Viewer) -> dict[str, Any]:
    return {"who": who, "csrf": csrf_token(request, who)}


def _error_page(request: Request, who: Viewer, exc: APIError) -> HTMLResponse:
    """The API's refusal (a batch or file not found for this key, a bad CSRF token) as a page."""
    return _html(request, "server/error.html", exc.status, message=str(exc), **_context(request, who))


@router.get("/")
async def root() -> Response:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui/static/{name}")
async def static(name: str) -> Response:
    return asset_response(name) or Response("Not found", status_code=404, media_type="text/plain")


@router.get("/ui")
async def batches_page(request: Request) -> Response:
    return await _batches_view(request, "server/batches.html", engine=True)


@router.get("/ui/fragments/batches")
async def batches_fragment(request: Request) -> Response:
    return await _batches_view(request, "server/_batches_table.html")


async def _batches_view(request: Request, template: str, *, engine: bool = False) -> Response:
    """The batches table: in the whole page (with the engine panel), or alone for the page's polling."""
    who = _guarded(request)
    if isinstance(who, Response):
        return who
    table = _batches_table(request, who)
    if isinstance(table, Response):
        return table
    panel = {"engine": await engine_panel(server_state(request))} if engine else {}
    return _html(request, template, **_context(request, who), **table, **panel)


@router.get("/ui/fragments/engine")
async def engine_fragment(request: Request) -> Response:
    who = _guarded(request)
    if isinstance(who, Response):
        return who
    return _html(request, "server/_engine.html", engine=await engine_panel(server_state(request)))


def _batches_table(request: Request, who: Viewer) -> dict[str, Any] | Response:
    srv = server_state(request)
    assert srv.store is not None
    status = request.query_params.get("status") or None
    after = request.query_params.get("after") or None
    if status is not None and status not in _STATUSES:
        return _html(
            request, "server/error.html", 400, message=f"Unknown status {status!r}; use one of {', '.join(_STATUSES)}."
        )
    page = srv.store.list_batches(who.owner, after=after, limit=PAGE_SIZE, status=status)
    if page is None:
        return _html(request, "server/error.html", 404, message=f"No batch {after!r} to page after.")
    rows, more = page
    counts = srv.store.count_by_status(who.owner)
    query = "&".join(f"{k}={quote(v)}" for k, v in (("status", status), ("after", after)) if v)
    return {
        "batches": [BatchView(b) for b in rows],
        "more": more,
        "status": status,
        "after": after,
        "query": query,
        "counts": counts,
        "total": sum(counts.values()),
        "statuses": [s for s in _STATUSES if counts.get(s)],
    }


@router.get("/ui/batches/{batch_id}")
async def batch_page(batch_id: str, request: Request) -> Response:
    return await _batch(batch_id, request, "server/batch.html")


@router.get("/ui/fragments/batches/{batch_id}")
async def batch_fragment(batch_id: str, request: Request) -> Response:
    return await _batch(batch_id, request, "server/_batch_live.html")


async def _batch(batch_id: str, request: Request, template: str) -> Response:
    who = _guarded(request)
    if isinstance(who, Response):
        return who
    srv = server_state(request)
    try:
        b = srv.batch(batch_id, who.owner)
    except APIError as exc:
        return _error_page(request, who, exc)
    return _html(
        request, template, **_context(request, who), view=BatchView(b), chart=batch_chart(srv, b),
        errors=error_lines(srv, b), files=_files_of(srv, b.input_file_id, b.output_file_id, b.error_file_id),
    )  # fmt: skip


def _files_of(srv: ServerState, *ids: str | None) -> list[Any]:
    """The batch's input, output and error files that still exist (None where there is none)."""
    assert srv.store is not None
    return [srv.store.get_file(i) if i else None for i in ids]


@router.post("/ui/batches/{batch_id}/cancel")
async def cancel(batch_id: str, request: Request) -> Response:
    who = _guarded(request)
    if isinstance(who, Response):
        return who
    form = await request.form()
    token = form.get("csrf")
    try:
        check_csrf(request, who, token if isinstance(token, str) else None)
        _batches.cancel(server_state(request), batch_id, who.owner)
    except APIError as exc:
        return _error_page(request, who, exc)
    return RedirectResponse(f"/ui/batches/{quote(batch_id)}", status_code=303)


@router.get("/ui/files/{file_id}")
async def download(file_id: str, request: Request) -> Response:
    who = _guarded(request)
    if isinstance(who, Response):
        return who
    srv = server_state(request)
    try:
        f = srv.file(file_id, who.owner)
    except APIError as exc:
        return _error_page(request, who, exc)
    return _FileResponse(files_dir(srv.config) / f.id, media_type="application/octet-stream", filename=f.filename)


@router.get("/ui/login")
async def login_page(request: Request) -> Response:
    if not server_state(request).has_keys:
        return RedirectResponse("/ui", status_code=303)
    why = request.query_params.get("why", "")
    return _html(request, "server/login.html", error=why, next=_next(request.query_params.get("next")))


@router.post("/ui/login")
async def login(request: Request) -> Response:
    srv = server_state(request)
    form = await request.form()
    key = form.get("key")
    target = _next(form.get("next") if isinstance(form.get("next"), str) else None)  # type: ignore[arg-type]
    if not isinstance(key, str) or not key.strip():
        return _html(request, "server/login.html", 400, error="Enter an API key.", next=target)
    try:
        srv.owner_of(f"Bearer {key.strip()}")
    except APIError:
        return _html(request, "server/login.html", 401, error="That key is not accepted by this server.", next=target)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE, key.strip(), max_age=_COOKIE_SECONDS, path="/", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    who = _guarded(request)
    if isinstance(who, Response):
        return who
    form = await request.form()
    token = form.get("csrf")
    try:
        check_csrf(request, who, token if isinstance(token, str) else None)
    except APIError as exc:
        return _error_page(request, who, exc)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _next(target: str | None) -> str:
    """Where to go after signing in: a dashboard page of this server, never another site."""
    if target and target.startswith("/ui") and not target.startswith("/ui/login"):
        return target
    return "/ui"
