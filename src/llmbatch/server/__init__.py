"""llmbatch's server: a self-hostable OpenAI-compatible Files + Batches API."""

from __future__ import annotations

import sys

from ._app import create_app
from ._config import ServerConfig, parse_size, parse_window
from ._errors import APIError

__all__ = ["APIError", "ServerConfig", "create_app", "parse_size", "parse_window", "serve"]


_SWITCH_INTERVAL = 0.001


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Runs the server in this process until interrupted."""
    import uvicorn

    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # optional: plain asyncio works, more slowly
        loop = "asyncio"
    # Heavy requests are worked on in threads; the event loop waits for the GIL at each handover,
    # by default up to 5 ms, several times per request it answers. 1 ms keeps health checks and
    # polls fast while a big answer is built, for a little more switching in those threads.
    sys.setswitchinterval(_SWITCH_INTERVAL)
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        loop=loop,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
