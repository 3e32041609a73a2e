"""llmbatch's server: a self-hostable OpenAI-compatible Files + Batches API."""

from __future__ import annotations

from ._app import create_app
from ._config import ServerConfig, parse_size, parse_window
from ._errors import APIError

__all__ = ["APIError", "ServerConfig", "create_app", "parse_size", "parse_window", "serve"]


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Runs the server in this process until interrupted."""
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # optional: plain asyncio works, more slowly
        loop = "asyncio"
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        loop=loop,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
