"""A reverse proxy that breaks chosen calls: an outage, or an answer lost after the work was done.

Put in front of a real `llmbatch serve`, it forwards every request unchanged except those
matching a rule, which it either refuses with a 503 (`fail`: the call never reached the
provider) or forwards and then answers with a 503 anyway (`lose`: the provider did the work,
the client never heard). The second is the crash window the job runner's reconciliation
exists for. 503s carry `retry-after-ms` so the SDK's own retries take milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FlakyProxy", "make_proxy"]


@dataclass
class FlakyProxy:
    """Rules and what happened: `plans[(method, path)]` is the list of outcomes for the next calls."""

    target: str
    plans: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def next_outcome(self, method: str, path: str) -> str:
        plan = self.plans.get((method, path))
        outcome = plan.pop(0) if plan else "pass"
        self.log.append((method, path, outcome))
        return outcome


def _outage() -> Response:
    return JSONResponse(
        {"error": {"message": "service unavailable (injected)", "type": "server_error", "code": None}},
        status_code=503,
        headers={"retry-after-ms": "5"},
    )


def make_proxy(target: str) -> tuple[Starlette, FlakyProxy]:
    """An ASGI app forwarding to `target` (e.g. http://127.0.0.1:PORT) and its rule book."""
    state = FlakyProxy(target)
    client = httpx.AsyncClient(base_url=target, timeout=60)

    async def forward(request: Request) -> Response:
        outcome = state.next_outcome(request.method, request.url.path)
        if outcome == "fail":
            return _outage()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        upstream = await client.request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        if outcome == "lose":
            return _outage()
        drop = {"content-length", "transfer-encoding", "content-encoding", "connection"}
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in drop},
        )

    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "DELETE"])])
    return app, state
