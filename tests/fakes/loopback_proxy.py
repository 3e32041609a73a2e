"""A forward proxy (or a plain TCP relay) on 127.0.0.1 that sends every connection to one port.

As a proxy it takes absolute-form HTTP requests and CONNECT tunnels, whatever host they name,
so a client can only reach a made-up host such as `upstream.test` through it; it records the
first request line of each connection. As a relay (`relay=True`) it passes raw bytes, TLS
included, and only counts connections. Runs on the caller's event loop:

    async with LoopbackProxy(port) as proxy:
        ... proxy.url, proxy.requests, proxy.connections
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

__all__ = ["LoopbackProxy"]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


class LoopbackProxy:
    def __init__(self, target_port: int, *, relay: bool = False) -> None:
        self.target_port = target_port
        self.relay = relay
        #: Connections accepted.
        self.connections = 0
        #: The first request line of each proxied connection ("CONNECT host:port HTTP/1.1", ...).
        self.requests: list[str] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> LoopbackProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        if not self.relay:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                writer.close()
                up_writer.close()
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.requests.append(line)
            if line.startswith("CONNECT "):
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:  # the upstream (uvicorn) takes the absolute-form target as it is
                up_writer.write(head)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
