"""What the routes share: the config, store, engine, batch worker and the caller's identity."""

from __future__ import annotations

import time

from fastapi import Request
from prometheus_client import CollectorRegistry

from .._text import clip
from ..engines import Engine, create_engine
from ._config import ServerConfig, key_owner
from ._errors import APIError
from ._history import ProgressHistory
from ._limits import MAX_ID_CHARS
from ._metrics import EngineMeter, public_registry
from ._store import BatchRow, FileRow, Store
from ._worker import BatchWorker

__all__ = ["ServerState", "server_state"]


class ServerState:
    """The state behind the routes: config, store, engine, worker, auth.

    The store and worker exist while the app's lifespan runs (see `create_app`).
    """

    def __init__(self, config: ServerConfig, engine: Engine | None) -> None:
        self.config = config
        self.engine = engine or _build_engine(config)
        self._keys = {k: key_owner(k) for k in config.api_keys}
        self.store: Store | None = None
        self.worker: BatchWorker | None = None
        #: Every engine call, counted and timed (/metrics, the dashboard's engine panel).
        self.meter = EngineMeter()
        #: The API's HTTP requests by route and status (filled by `HTTPMeter`).
        self.http_metrics = CollectorRegistry(auto_describe=True)
        #: Process-level series, public even with keys.
        self.public_metrics = public_registry(self)
        #: Running batches' counts over time (the dashboard's batch chart).
        self.history = ProgressHistory()
        self.started_at = time.time()
        #: Why the engine could not start (one line for the log instead of a traceback).
        self.start_error: str | None = None

    @property
    def has_keys(self) -> bool:
        """Whether callers need a key (else the server is open)."""
        return bool(self._keys)

    def owner(self, request: Request) -> str:
        """The caller's owner tag; raises 401 when keys are configured and the caller has none of them."""
        return self.owner_of(request.headers.get("authorization", "")) if self._keys else ""

    def owner_of(self, auth: str) -> str:
        """The owner tag for an Authorization header value (see `owner`)."""
        if not self._keys:
            return ""
        scheme, _, key = auth.partition(" ")
        owner = self._keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if owner is None:
            message = (
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                if not auth
                else "Incorrect API key provided."
            )
            raise APIError(401, message, code="invalid_api_key")
        return owner

    def file(self, file_id: str, owner: str) -> FileRow:
        assert self.store is not None
        f = self.store.get_file(file_id, owner) if len(file_id) <= MAX_ID_CHARS else None
        if f is None:
            raise APIError(404, f"No such File object: {clip(file_id)}", param="id", code="file_not_found")
        return f

    def batch(self, batch_id: str, owner: str) -> BatchRow:
        assert self.store is not None
        b = self.store.get_batch(batch_id, owner) if len(batch_id) <= MAX_ID_CHARS else None
        if b is None:
            raise APIError(404, f"No batch found with id '{clip(batch_id)}'.", param="batch_id", code="batch_not_found")
        return b


def _build_engine(config: ServerConfig) -> Engine:
    if config.executor == "ray":
        from ._ray import RayEngine

        return RayEngine(config)
    return create_engine(config.engine, config.engine_options)


def server_state(request: Request) -> ServerState:
    """The state of the app serving `request` (set by `create_app` on `app.state.server`)."""
    state: ServerState = request.app.state.server
    return state
