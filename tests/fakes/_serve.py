"""Runs an ASGI app on a real uvicorn server on 127.0.0.1, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

__all__ = ["serve_app"]


@contextmanager
def serve_app(app: Any, timeout: float = 10.0, **config: Any) -> Iterator[str]:
    """Serves `app` until the block ends; yields its root URL (`http://127.0.0.1:PORT`, or
    https when `config` carries `ssl_certfile`). `config`: more `uvicorn.Config` settings.

    The socket is bound here and handed to uvicorn, so no other process can take the port
    between choosing and serving it.
    """
    settings: dict[str, Any] = {"log_level": "warning", "access_log": False, **config}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **settings))  # off the main thread, uvicorn leaves signals alone
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        scheme = "https" if settings.get("ssl_certfile") else "http"
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
