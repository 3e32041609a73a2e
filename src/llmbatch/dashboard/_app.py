"""The jobs dashboard's web app: read-only pages over the jobs in one job root.

- `/`: every job, newest first, 50 a page: state, provider, rows, spend, batches, ETA;
- `/jobs/{id}`: one job: its figures, rows and spend over time, its batches with the provider's
  ids, its failed rows (50 a page) and the commands that resume, cancel or export it.

The live parts refresh themselves through htmx (vendored in `llmbatch.ui`) from `/fragments/...`.
Nothing here writes: there are no forms, so no CSRF to guard, and the commands are for the
operator to run. Requests naming another host are refused (`TrustedHostMiddleware`): a web page
whose DNS name was pointed at 127.0.0.1 cannot read the jobs through the browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from .. import __version__
from ..ui import asset_response, environment
from ._charts import rows_chart, spend_chart
from ._read import job_dirs, read_job

__all__ = ["create_app"]

#: Jobs on one page of the list.
PAGE_SIZE = 50
#: Hosts a loopback dashboard answers to.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_env = environment()
_env.filters["usd"] = lambda v: "\u2014" if v is None else f"${v:,.4f}"


def create_app(job_root: Path, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The dashboard over the jobs in `job_root`; it answers requests naming `allowed_hosts`
    (default: the loopback names; `["*"]`: any)."""

    def html(template: str, status: int = 200, **context: Any) -> HTMLResponse:
        base = {"static": "/static", "home": "/", "version": __version__, "root": str(job_root)}
        headers = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}
        return HTMLResponse(_env.get_template(template).render({**base, **context}), status, headers=headers)

    def job_list(request: Request) -> dict[str, Any]:
        page = max(0, _int(request.query_params.get("page"), 0))
        views = sorted((read_job(d) for d in job_dirs(job_root)), key=lambda v: (v.created_at, v.id), reverse=True)
        shown = views[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
        return {"jobs": shown, "page": page, "more": len(views) > (page + 1) * PAGE_SIZE, "count": len(views)}

    def jobs_page(request: Request) -> Response:
        return html("jobs/jobs.html", **job_list(request))

    def jobs_fragment(request: Request) -> Response:
        return html("jobs/_jobs_table.html", **job_list(request))

    def one_job(request: Request, template: str) -> Response:
        job = request.path_params["job"]
        job_dir = job_root / job
        # The name of a job directory and nothing else: no path, no dot-name, a store inside.
        if Path(job).name != job or job.startswith(".") or not (job_dir / "job.sqlite").is_file():
            return html("jobs/error.html", 404, message=f"No job {job!r} in {job_root}.")
        after = _int(request.query_params.get("after"), -1)
        view = read_job(job_dir, detail=True, failures_after=after)
        charts = (rows_chart(view), spend_chart(view)) if view.problem is None else (None, None)
        return html(template, v=view, after=after, rows_chart=charts[0], spend_chart=charts[1])

    def job_page(request: Request) -> Response:
        return one_job(request, "jobs/job.html")

    def job_fragment(request: Request) -> Response:
        return one_job(request, "jobs/_job_live.html")

    def static(request: Request) -> Response:
        return asset_response(request.path_params["name"]) or Response("Not found", 404, media_type="text/plain")

    # Sync endpoints: Starlette runs them in its thread pool, so a slow read holds no other page.
    routes = [
        Route("/", jobs_page),
        Route("/fragments/jobs", jobs_fragment),
        Route("/jobs/{job}", job_page),
        Route("/fragments/jobs/{job}", job_fragment),
        Route("/static/{name}", static),
    ]
    hosts = allowed_hosts or list(LOOPBACK_HOSTS)
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
