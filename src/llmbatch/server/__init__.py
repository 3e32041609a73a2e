"""llmbatch's server: a self-hostable OpenAI-compatible Files + Batches API."""

from __future__ import annotations

import socket

from ._app import create_app
from ._config import ServerConfig, parse_size, parse_window
from ._errors import APIError
from ._listen import bind_port, lock_data_dir

__all__ = [
    "APIError",
    "ServerConfig",
    "bind_port",
    "create_app",
    "lock_data_dir",
    "parse_size",
    "parse_window",
    "serve",
]


def serve(config: ServerConfig, sock: socket.socket, log_level: str = "info") -> None:
    """Runs the server in this process on `sock` (from `bind_port`) until interrupted."""
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # optional: plain asyncio works, more slowly
        loop = "asyncio"
    settings = uvicorn.Config(
        create_app(config), loop=loop, log_level=log_level, access_log=False, timeout_graceful_shutdown=5
    )
    uvicorn.Server(settings).run(sockets=[sock])
