"""The openai engine: forwards each request to an OpenAI-compatible direct API.

Any server that speaks OpenAI's HTTP API works as the upstream: vLLM, Ollama, the
llama.cpp server, OpenAI itself. Successful answers are passed through byte for byte;
429s, 5xx answers, timeouts and connection errors are retried with backoff.

The HTTP client is a small keep-alive HTTP/1.1 pool on asyncio protocols and httptools,
because with hundreds of requests in flight httpx's connection pool costs milliseconds of
CPU per request (its bookkeeping is quadratic in the pool size) and aiohttp about a quarter
of a millisecond, which on a small machine caps a batch well below what the upstream could
serve. When httptools is missing (Windows) or a proxy is configured for the upstream, the
engine falls back to httpx, which handles those cases.
"""

from __future__ import annotations

import asyncio
import math
import random
import ssl
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from .. import __version__
from .._exceptions import ConfigError
from ._base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MODERATIONS,
    RESPONSES,
    Engine,
    EngineRequest,
    EngineResponse,
    error_body,
    usage_from_body,
)

try:  # httptools is installed everywhere but Windows; without it the engine uses httpx.
    import httptools
except ImportError:  # pragma: no cover - exercised only where httptools has no wheel
    httptools = None

if TYPE_CHECKING:
    from ._options import OpenAIOptions

__all__ = ["OpenAIForwardEngine", "parse_retry_after", "RETRYABLE_STATUSES", "MAX_RETRY_AFTER"]

#: Upstream statuses worth another attempt: rate limits and transient server trouble.
RETRYABLE_STATUSES: frozenset[int] = frozenset({429, 500, 502, 503, 504})
#: The longest server-requested wait we honour; a larger Retry-After would stall a batch.
MAX_RETRY_AFTER: float = 60.0

_MISSING_URL = (
    "the openai engine needs --upstream-url (the base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1)"
)

#: (status, headers with lower-case names, body bytes)
_Answer = tuple[int, Mapping[str, str], bytes]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Looks `name` (lower case) up in `headers`, case-insensitively even for a plain dict."""
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        for key, val in headers.items():
            if key.lower() == name:
                return val
    return value


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait, from `retry-after-ms` or `Retry-After`.

    `Retry-After` may be delta-seconds or an HTTP-date. Returns None when neither header
    is present or parseable; never a negative number.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value / 1000.0
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        # HTTP dates are always GMT; a naive result only means the zone name was odd.
        return max(0.0, when.timestamp() - time.time() - time.timezone)
    return max(0.0, when.timestamp() - time.time())


class _TransportError(Exception):
    """An attempt got no HTTP answer. `retryable` marks transient network failures."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class _Transport(Protocol):
    """What the engine needs from an HTTP client; raises TimeoutError or _TransportError."""

    async def request(self, method: str, path: str, body: bytes | None) -> _Answer: ...

    async def aclose(self) -> None: ...


class _ConnectionLost(Exception):
    """The connection closed before a complete answer; `received` says if any byte came."""

    def __init__(self, received: bool, exc: Exception | None) -> None:
        super().__init__(f"server closed the connection{': ' + str(exc) if exc else ''}")
        self.received = received


class _H1Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time."""

    def __init__(self, live: set[_H1Connection]) -> None:
        self._live = live
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[_Answer] | None = None
        self.closed = False
        self._received = False
        self._headers_done = False
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._live.add(self)

    def send(self, data: bytes, waiter: asyncio.Future[_Answer]) -> None:
        self.waiter = waiter
        self._received = self._headers_done = False
        self._headers = {}
        self._chunks = []
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Bytes nobody asked for (on an idle connection): what follows would be misread.
            self.abort()
            return
        self._received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(_TransportError(f"malformed HTTP answer from upstream: {exc}", retryable=True))
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints); the real one follows
            self._headers, self._chunks, self._headers_done = {}, [], False
            return
        if not self.parser.should_keep_alive():
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, self._headers, b"".join(self._chunks)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._live.discard(self)
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        h = self._headers
        if self._headers_done and "content-length" not in h and "transfer-encoding" not in h:
            # A body without a length ends where the connection ends (HTTP/1.0 style).
            waiter.set_result((self.parser.get_status_code(), h, b"".join(self._chunks)))
        else:
            waiter.set_exception(_ConnectionLost(self._received, exc))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


def _expire(waiter: asyncio.Future[_Answer]) -> None:
    """Ends an attempt whose deadline passed; the waiting caller then drops the connection."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _H1Pool:
    """A keep-alive pool of HTTP/1.1 connections to one origin.

    Holds at most as many connections as callers in flight; the engine's semaphore bounds
    those, so there is no queueing here.
    """

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        host_header = url.netloc.rpartition("@")[2]
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host_header, **headers}.items())
        self._heads: dict[tuple[str, str], bytes] = {}
        self._timeout = timeout
        self._idle: list[_H1Connection] = []
        self._live: set[_H1Connection] = set()

    def _head(self, method: str, path: str) -> bytes:
        head = self._heads.get((method, path))
        if head is None:
            line = f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._fixed}"
            head = self._heads[(method, path)] = line.encode("latin-1")
        return head

    async def _connect(self) -> _H1Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _H1Connection(self._live), self._host, self._port, ssl=self._ssl
            )
        except OSError as exc:
            raise _TransportError(
                f"cannot connect to {self._host}:{self._port}: {exc.strerror or exc}", retryable=True
            ) from exc
        return conn

    async def request(self, method: str, path: str, body: bytes | None) -> _Answer:
        head = self._head(method, path)
        if body is None:
            data = head + b"\r\n"
        else:
            data = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        loop = asyncio.get_running_loop()
        # One deadline for the whole attempt, connecting included. A bare timer on the
        # answer's future costs less than asyncio.timeout() on this hot path.
        deadline = loop.time() + self._timeout
        while True:
            conn = None
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                    break
                conn = None
            reused = conn is not None
            if conn is None:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connect()
            waiter: asyncio.Future[_Answer] = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            conn.send(data, waiter)
            try:
                status, headers, content = await waiter
            except _ConnectionLost as exc:
                if reused and not exc.received:
                    # The server dropped an idle keep-alive connection just as we reused
                    # it; that says nothing about the upstream, so resend at once.
                    continue
                raise _TransportError(f"upstream {exc}", retryable=True) from exc
            except BaseException:
                # Timed out or cancelled mid-answer: the connection is in an unknown state.
                conn.abort()
                raise
            finally:
                timer.cancel()
            if not conn.closed:
                self._idle.append(conn)
            encoding = headers.get("content-encoding")
            if encoding in ("gzip", "deflate"):
                try:
                    content = zlib.decompress(content, 47)  # 47: gzip or zlib header, detected
                except zlib.error as exc:
                    raise _TransportError(f"cannot decompress upstream answer: {exc}", retryable=True) from exc
            return status, headers, content

    async def aclose(self) -> None:
        for conn in list(self._live):
            conn.abort()
        self._idle.clear()


class _HttpxTransport:
    """The fallback client: httpx, for proxies and platforms without httptools."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float, size: int) -> None:
        import httpx

        self._httpx = httpx
        self._base = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
        )

    async def request(self, method: str, path: str, body: bytes | None) -> _Answer:
        httpx = self._httpx
        try:
            resp = await self._client.request(method, self._base + path, content=body)
        except httpx.TimeoutException as exc:
            raise TimeoutError(str(exc)) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
            raise _TransportError(f"{type(exc).__name__}: {exc}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise _TransportError(f"{type(exc).__name__}: {exc}", retryable=False) from exc
        return resp.status_code, resp.headers, resp.content

    async def aclose(self) -> None:
        await self._client.aclose()


def _uses_proxy(base_url: str) -> bool:
    """Whether the environment routes `base_url` through a proxy (HTTPS_PROXY, NO_PROXY...)."""
    url = urllib.parse.urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(url.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(url.hostname or "")


def _error_passthrough(status: int, content: bytes) -> EngineResponse:
    """An upstream error answer: its body unchanged when JSON, else wrapped in an envelope."""
    try:
        orjson.loads(content)
    except orjson.JSONDecodeError:
        text = content.decode("utf-8", "replace").strip() or f"upstream answered HTTP {status}"
        return EngineResponse(status, error_body(text[:2000], "upstream_error"))
    return EngineResponse(status, content)


class OpenAIForwardEngine(Engine):
    """Forwards every request to `config.upstream_url`, an OpenAI-compatible base URL."""

    name = "openai"
    endpoints = frozenset({CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MODERATIONS})

    def __init__(self, config: OpenAIOptions, *, backoff_base: float = 0.5, backoff_cap: float = 30.0) -> None:
        if not config.upstream_url:
            raise ConfigError(_MISSING_URL)
        url = urllib.parse.urlsplit(config.upstream_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"--upstream-url {config.upstream_url!r} is not an http(s) URL "
                "(expected the base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1)"
            )
        self.config = config
        self.base_url = config.upstream_url.rstrip("/")
        self.max_concurrency = config.max_concurrency
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        # Endpoints carry "/v1" and so does the base URL; the upstream path drops ours.
        self._paths = {ep: ep.removeprefix("/v1") for ep in self.endpoints}
        self._http: _Transport | None = None
        # One bound on everything in flight (batch rows and direct calls alike), so the
        # upstream never sees more than max_concurrency requests from us. Remade in start()
        # because a semaphore belongs to the event loop that first waits on it.
        self._slots = asyncio.Semaphore(config.max_concurrency)

    def _headers(self) -> dict[str, str]:
        headers = {
            "User-Agent": f"llmbatch/{__version__}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        if self.config.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.config.upstream_api_key}"
        return headers

    async def start(self) -> None:
        if self._http is not None:
            return
        self._slots = asyncio.Semaphore(self.config.max_concurrency)
        headers = self._headers()
        if httptools is None or _uses_proxy(self.base_url):
            self._http = _HttpxTransport(
                self.base_url, headers, self.config.request_timeout, self.config.max_concurrency
            )
        else:
            # Compression costs CPU on both ends for little gain on JSON answers of a few
            # KB; gzip answers from servers that ignore this are still decoded.
            headers["Accept-Encoding"] = "identity"
            self._http = _H1Pool(self.base_url, headers, self.config.request_timeout)

    async def aclose(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        delay = min(self.backoff_cap, self.backoff_base * (2**attempt))
        # Jitter spreads out the retries of many rows that failed together.
        return delay / 2 + random.random() * delay / 2

    async def handle(self, request: EngineRequest) -> EngineResponse:
        path = self._paths.get(request.endpoint)
        if path is None:
            return EngineResponse(
                404,
                error_body(f"the openai engine does not serve {request.endpoint}", "invalid_request_error"),
            )
        if self._http is None:
            await self.start()
        http = self._http
        assert http is not None
        payload = orjson.dumps(request.body)
        attempts = self.config.max_retries + 1
        last: EngineResponse | None = None
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            async with self._slots:
                try:
                    status, headers, content = await http.request("POST", path, payload)
                except TimeoutError:
                    last = EngineResponse(
                        504,
                        error_body(
                            f"upstream timed out after {attempt} attempts: no answer within "
                            f"{self.config.request_timeout:g} s",
                            "timeout",
                            code="upstream_timeout",
                        ),
                    )
                except _TransportError as exc:
                    if not exc.retryable:
                        return EngineResponse(502, error_body(f"upstream request failed: {exc}", "upstream_error"))
                    last = EngineResponse(
                        502,
                        error_body(
                            f"upstream unreachable after {attempt} attempts: {exc}",
                            "upstream_error",
                            code="upstream_unreachable",
                        ),
                    )
                else:
                    if 200 <= status < 300:
                        try:
                            parsed = orjson.loads(content)
                        except orjson.JSONDecodeError:
                            return EngineResponse(
                                502,
                                error_body(
                                    f"upstream answered HTTP {status} with a non-JSON body "
                                    f"(content-type {headers.get('content-type', 'missing')})",
                                    "upstream_error",
                                    code="upstream_bad_response",
                                ),
                            )
                        return EngineResponse(status, content, usage=usage_from_body(parsed))
                    last = _error_passthrough(status, content)
                    if status not in RETRYABLE_STATUSES:
                        return last
                    retry_after = parse_retry_after(headers)
                    if retry_after is not None and status in (429, 503):
                        # Direct callers get the upstream's own advice on when to come back.
                        last.headers = {"Retry-After": str(math.ceil(retry_after))}
            # Sleep outside the semaphore so a waiting row does not hold a slot hostage.
            if attempt < attempts:
                await asyncio.sleep(self._backoff(attempt - 1, retry_after))
        assert last is not None
        return last

    async def list_models(self) -> list[dict[str, Any]]:
        try:
            if self._http is None:
                await self.start()
            assert self._http is not None
            async with self._slots:
                status, _, content = await self._http.request("GET", "/models", None)
            data = orjson.loads(content).get("data") if status == 200 else None
        except (TimeoutError, _TransportError, orjson.JSONDecodeError, AttributeError):
            return []
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
