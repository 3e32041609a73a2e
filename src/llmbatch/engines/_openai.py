"""The openai engine: forwards each request to an OpenAI-compatible direct API.

Any server that speaks OpenAI's HTTP API works as the upstream: vLLM, Ollama, the
llama.cpp server, OpenAI itself. Successful answers are passed through byte for byte;
429s, 5xx answers, timeouts and connection errors are retried with backoff, honouring
Retry-After; TLS failures and answers over the size cap are final.

HTTP goes through a transport (`_http.py`): aiohttp by default, with certifi's CA bundle,
proxies from the environment, no silent resend of a POST, and a cap on answer size. Tests
and benchmarks may pass their own transport.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.parse
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

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
from ._http import DEFAULT_MAX_RESPONSE_BYTES, AiohttpTransport, Transport, TransportError

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

    def __init__(
        self,
        config: OpenAIOptions,
        *,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        transport: Transport | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        """`transport` replaces the aiohttp one (tests, benchmarks); `max_response_bytes` caps
        the size of one upstream answer."""
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
        self._http: Transport = transport or AiohttpTransport(
            self.base_url, self._headers(), config.request_timeout, max_response_bytes=max_response_bytes
        )
        self._started = False
        # One bound on everything in flight (batch rows and direct calls alike), so the
        # upstream never sees more than max_concurrency requests from us. Remade in start()
        # because a semaphore belongs to the event loop that first waits on it.
        self._slots = asyncio.Semaphore(config.max_concurrency)

    def _headers(self) -> dict[str, str]:
        headers = {
            "User-Agent": f"llmbatch/{__version__}",
            "Accept": "application/json",
            "Content-Type": "application/json",
            # Compression costs CPU on both ends for little gain on JSON answers of a few
            # KB; gzip answers from servers that ignore this are still decoded.
            "Accept-Encoding": "identity",
        }
        if self.config.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.config.upstream_api_key}"
        return headers

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._slots = asyncio.Semaphore(self.config.max_concurrency)

    async def aclose(self) -> None:
        self._started = False
        await self._http.aclose()

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
        if not self._started:
            await self.start()
        http = self._http
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
                except TransportError as exc:
                    if not exc.retryable:
                        return EngineResponse(
                            502, error_body(f"upstream request failed: {exc}", "upstream_error", code=exc.code)
                        )
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
            if not self._started:
                await self.start()
            async with self._slots:
                status, _, content = await self._http.request("GET", "/models", None)
            data = orjson.loads(content).get("data") if status == 200 else None
        except (TimeoutError, TransportError, orjson.JSONDecodeError, AttributeError):
            return []
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
