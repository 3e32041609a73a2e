"""The HTTP transport of the openai engine: aiohttp, maintained by others, behind a small seam.

The engine needs one thing from HTTP: send a request to the upstream and get back
(status, headers, body bytes), or learn why not. `Transport` is that seam; tests and
benchmarks may pass their own. `AiohttpTransport` is the real one:

- TLS is verified against certifi's CA bundle, as the openai SDK does (SSL_CERT_FILE or
  SSL_CERT_DIR name another, again as the SDK does). A certificate or handshake failure is
  final: retrying cannot fix a configuration problem.
- Proxies come from HTTP_PROXY / HTTPS_PROXY / NO_PROXY, HTTPS through a CONNECT tunnel,
  looked up the way aiohttp's `trust_env` does, but once per session: `trust_env` looks the
  proxy and ~/.netrc up again for every request, each in a worker thread (bench_server's
  forwarding figure: 4.25x ideal with it, ~2.7x without), and would send netrc passwords
  to the upstream.
- A POST is sent at most once per call. aiohttp resends a request that met a stale keep-alive
  connection only for idempotent methods (RFC 9112 section 9.3.1.1; aiohttp >= 3.9); a POST
  that meets one fails here, and the engine's retry policy decides, counting it as an attempt.
- An answer larger than `max_response_bytes` (after decompression) is refused while it is read,
  never buffered whole.

Errors, translated once here:

    TimeoutError            no complete answer within the timeout (connecting included)
    TransportError          no usable answer; `retryable` says whether another attempt may help
      retryable=True:       connection refused/reset/closed, a torn or malformed answer
      retryable=False:      TLS problems, an answer over the size cap, unusable URLs
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Protocol

import aiohttp
import certifi
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "Answer", "AiohttpTransport", "Transport", "TransportError", "ssl_context"]

#: The largest upstream answer read by default: far above any chat or embeddings answer, far
#: below what would hurt a server running hundreds of rows at once.
DEFAULT_MAX_RESPONSE_BYTES: int = 64 * 2**20

#: Seconds a kept-alive connection may sit idle before we close it. aiohttp checks every
#: this-many seconds, so a connection lives at most twice as long: under uvicorn's 5 s, the
#: shortest common server default, so we close first instead of racing the server's close.
_KEEPALIVE_S = 2.0

#: (status, headers looked up case-insensitively, body bytes)
Answer = tuple[int, Mapping[str, str], bytes]


class TransportError(Exception):
    """An attempt got no usable HTTP answer.

    `retryable` marks transient network failures; `code` is the error code the engine's
    error row carries for a final one.
    """

    def __init__(self, message: str, *, retryable: bool, code: str = "upstream_error") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class Transport(Protocol):
    """What the engine needs from an HTTP client; raises TimeoutError or TransportError.

    `aclose` releases connections; a later `request` may open new ones.
    """

    async def request(self, method: str, path: str, body: bytes | None) -> Answer: ...

    async def aclose(self) -> None: ...


def ssl_context() -> ssl.SSLContext:
    """The CA store the openai SDK uses: SSL_CERT_FILE, else SSL_CERT_DIR, else certifi's bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


def _tls_hint() -> str:
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return "check the CA file named by SSL_CERT_FILE / SSL_CERT_DIR"
    return "llmbatch trusts certifi's CA bundle; for a private CA set SSL_CERT_FILE to its PEM file"


def _translate(exc: aiohttp.ClientError) -> Exception:
    """One aiohttp error as TimeoutError or TransportError. Order matters: TLS errors are
    connection errors too, and must not be retried as one."""
    if isinstance(exc, TimeoutError):  # ServerTimeoutError, ConnectionTimeoutError
        return TimeoutError(str(exc))
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return TransportError(
            f"the upstream's TLS certificate was rejected ({exc.certificate_error}); {_tls_hint()}",
            retryable=False,
            code="upstream_tls_error",
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return TransportError(
            f"TLS handshake with the upstream failed ({exc}); is it an https:// server?",
            retryable=False,
            code="upstream_tls_error",
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        transient = exc.status == 429 or exc.status >= 500
        return TransportError(f"the proxy refused the tunnel: HTTP {exc.status} {exc.message}", retryable=transient)
    if isinstance(exc, aiohttp.ClientConnectionError):
        return TransportError(f"{type(exc).__name__}: {exc}", retryable=True)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransportError(f"the answer was cut short: {exc}", retryable=True)
    if isinstance(exc, aiohttp.ClientResponseError):  # a malformed status line or headers
        return TransportError(f"malformed HTTP answer: {exc.message}", retryable=True)
    return TransportError(f"{type(exc).__name__}: {exc}", retryable=False)


def _too_large(cap: int) -> TransportError:
    return TransportError(
        f"the upstream's answer is larger than the {cap:,}-byte cap (max_response_bytes)",
        retryable=False,
        code="upstream_response_too_large",
    )


class AiohttpTransport:
    """Keep-alive HTTP/1.1 to one base URL through one aiohttp session.

    The session is opened on first use, on the running event loop, and closed by `aclose`.
    The engine bounds the requests in flight, so the pool never queues.
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        timeout: float,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = dict(headers)
        self._timeout = timeout
        self._cap = max_response_bytes
        self._tls = tls
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None

    def _open(self) -> aiohttp.ClientSession:
        try:
            self._proxy, self._proxy_auth = get_env_proxy_for_url(URL(self._base))
        except LookupError:  # none configured, or NO_PROXY names the host
            self._proxy = self._proxy_auth = None
        connector = aiohttp.TCPConnector(
            limit=0,  # the engine's semaphore is the bound; a second one here would only queue
            ssl=self._tls or ssl_context(),
            keepalive_timeout=_KEEPALIVE_S,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=False,  # the proxy was looked up above, once
            cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's cookies must not leak between rows
        )
        return self._session

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:  # parsed once per path: yarl's parsing is a visible cost per request
            url = self._urls[path] = URL(self._base + path)
        return url

    async def request(self, method: str, path: str, body: bytes | None) -> Answer:
        session = self._session or self._open()
        try:
            async with session.request(
                method,
                self._url(path),
                # a ready payload skips aiohttp's payload-type registry lookup on each request
                data=None if body is None else aiohttp.BytesPayload(body, content_type="application/json"),
                allow_redirects=False,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
            ) as resp:
                length = resp.content_length
                if length is not None and length > self._cap:
                    resp.close()  # drop the connection rather than drain a body we refuse
                    raise _too_large(self._cap)
                if length is not None and "Content-Encoding" not in resp.headers:
                    content = await resp.read()  # bounded by the length just checked
                else:
                    content = await self._read_capped(resp)
                return resp.status, resp.headers, content
        except aiohttp.ClientError as exc:
            raise _translate(exc) from exc

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body of an answer of unknown (or compressed) size, refused past the cap."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > self._cap:
                resp.close()
                raise _too_large(self._cap)
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
