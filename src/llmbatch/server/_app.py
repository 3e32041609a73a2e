"""The HTTP API: OpenAI's Files and Batches endpoints, the direct endpoints, models, health.

`create_app(config)` returns an ASGI app; its lifespan opens the store, starts the engine and
the batch worker, and resumes whatever batches were running when the server last stopped.
The routes live in `_files`, `_batches`, `_metrics` (/metrics), `_dashboard` (the web pages
at /ui) and here (health, models); the direct endpoints in `_direct`, in front of the FastAPI app.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from .. import __version__
from .._exceptions import ConfigError, EngineError
from .._text import clip
from ..engines import Engine
from . import _batches, _dashboard, _files, _metrics
from ._config import ServerConfig
from ._direct import DirectAPI
from ._disk import free_bytes
from ._errors import APIError, add_error_handlers, json_response, parse_json_object
from ._state import ServerState, server_state
from ._store import Store
from ._worker import BatchWorker

__all__ = ["create_app", "APIError", "parse_json_object"]

log = logging.getLogger("llmbatch.server")

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    # Public even when keys are set: process health only, nothing about any tenant.
    srv = server_state(request)
    full_since = srv.worker.disk_full_since if srv.worker is not None else None
    return json_response(
        {
            "status": "ok",
            "engine": srv.engine.name,
            "executor": srv.config.executor,
            **srv.engine.health(),
            "version": __version__,
            "uptime_seconds": round(time.time() - srv.started_at, 3),
            # full: a write failed for lack of space and none has succeeded since (batches wait).
            "disk": {
                "full": full_since is not None,
                "full_since": full_since,
                "free_bytes": free_bytes(srv.config.data_dir),
            },
        }
    )


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    srv = server_state(request)
    srv.owner(request)
    return json_response({"object": "list", "data": await srv.engine.list_models()})


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    srv = server_state(request)
    srv.owner(request)
    for m in await srv.engine.list_models():
        if m.get("id") == model_id:
            return json_response(m)
    raise APIError(404, f"The model '{clip(model_id)}' does not exist.", param="model", code="model_not_found")


def create_app(config: ServerConfig, engine: Engine | None = None) -> DirectAPI:
    """Builds the server's ASGI app. `engine` overrides the one named in the config.

    The direct endpoints are answered by `DirectAPI` in front of the FastAPI app, which
    serves everything else (and runs the lifespan).
    """
    srv = ServerState(config, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        srv.store = Store(config.data_dir / "llmbatch.sqlite")
        try:
            await srv.engine.start()
        except Exception as exc:  # a model that cannot load, a replica that cannot start, ...
            why = str(exc) if isinstance(exc, (ConfigError, EngineError)) else f"{type(exc).__name__}: {exc}"
            srv.start_error = f"the {srv.engine.name} engine cannot start: {why}"
            log.debug("engine start failed", exc_info=True)
            srv.store.close()
            raise
        srv.worker = BatchWorker(config, srv.store, srv.engine, srv.meter, srv.history)
        await srv.worker.start()
        log.info("llmbatch server ready: engine %s, data in %s", srv.engine.name, config.data_dir)
        try:
            yield
        finally:
            await srv.worker.stop()
            await srv.engine.aclose()
            srv.store.close()

    # No redirects: DirectAPI already treats `/v1/files/` as `/v1/files` (see there).
    app = FastAPI(title="llmbatch", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.server = srv
    add_error_handlers(app)
    app.include_router(router)
    app.include_router(_files.router)
    app.include_router(_batches.router)
    app.include_router(_metrics.router)
    app.include_router(_dashboard.router)
    app.add_middleware(_metrics.HTTPMeter, registry=srv.http_metrics)
    return DirectAPI(app, srv)
