"""The `local` provider: an llmbatch server inside the client's own process.

`llmbatch run --provider local` needs nothing configured: it starts the server on a free
loopback port, with its data under the job directory, so a job resumed after a crash finds
its batches (and the server resumes running them) just as with a remote provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import uvicorn

from .._exceptions import EngineError
from ..engines import EngineOptions
from ._base import ProviderLimits
from ._openai import OpenAIBatchProvider

__all__ = ["LocalProvider"]

LOCAL_LIMITS = ProviderLimits(max_requests=50_000, max_bytes=200 * 1024 * 1024, max_in_flight=4)


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The job runner owns Ctrl+C; uvicorn must not swallow it.
        yield


class LocalProvider(OpenAIBatchProvider):
    """An in-process llmbatch server running `engine`, reached through the OpenAI adapter."""

    name = "local"
    billed = False
    max_poll_interval = 0.5
    # The server runs inside the client's process: it stops with it, and resuming restarts it,
    # and it goes on from the rows its journal kept.
    after_interrupt = (
        "the local server stopped with this run, so nothing runs until the job is resumed; "
        "the rows it answered are kept"
    )

    def __init__(
        self,
        data_dir: Path,
        *,
        engine: str = "echo",
        engine_options: EngineOptions | None = None,
        limits: ProviderLimits = LOCAL_LIMITS,
    ) -> None:
        self.data_dir = data_dir
        self.engine = engine
        self.engine_options = engine_options
        self.limits = limits
        self.base_url = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from ..server import ServerConfig, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = ServerConfig(
            data_dir=self.data_dir,
            engine=self.engine,
            engine_options=self.engine_options,
            max_file_lines=self.limits.max_requests,
            max_file_bytes=self.limits.max_bytes,
            max_active_batches=self.limits.max_in_flight,
        )
        self._server = _EmbeddedServer(
            uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning", access_log=False)
        )
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception()
                raise EngineError(f"the local llmbatch server did not start: {exc}")
            await asyncio.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._client = openai.AsyncOpenAI(api_key="local", base_url=self.base_url, max_retries=3, timeout=600)

    async def answered_by(self) -> str | None:
        try:
            models = [m.id async for m in self._client.models.list()]
        except openai.OpenAIError:
            models = []
        if self.engine == "echo":
            what = "no model: each answer echoes its request's text"
        elif models:
            what = f"it serves {', '.join(models)}"
        else:
            what = "with its model"
        return f"local: the {self.engine} engine answers every row ({what})"

    async def aclose(self) -> None:
        if self._task is not None and self._server is not None:
            await self._client.close()
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
