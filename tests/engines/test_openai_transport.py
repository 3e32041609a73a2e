"""The openai engine's HTTP transport against real servers on 127.0.0.1: TLS with a test CA
(made by trustme), certificate failures, proxies from the environment.

The HTTPS upstream is uvicorn serving TLS; the proxy (tests/fakes/loopback_proxy.py) sends
every connection to the upstream's port whatever host it names, so a request for the made-up
host `upstream.test` can only succeed through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from fakes._serve import serve_app
from fakes.loopback_proxy import LoopbackProxy

from llmbatch.engines import EngineRequest, OpenAIOptions
from llmbatch.engines._openai import OpenAIForwardEngine

ANSWER = (
    b'{"id": "x",  "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
)
ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


class Counting:
    """Answers every POST with ANSWER and counts the requests that reached it."""

    def __init__(self) -> None:
        self.hits = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.hits += 1
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})


class TLSUpstream:
    def __init__(self, app: Counting, port: int, ca_file: Path) -> None:
        self.app, self.port, self.ca_file = app, port, ca_file


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSUpstream]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "upstream.test")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    app = Counting()
    tls = {"ssl_certfile": str(tmp / "cert.pem"), "ssl_keyfile": str(tmp / "key.pem")}
    # log_level critical: the handshakes the tests make fail would log
    with serve_app(app, log_level="critical", lifespan="off", timeout_graceful_shutdown=1, **tls) as root:
        yield TLSUpstream(app, int(root.rsplit(":", 1)[1]), tmp / "ca.pem")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def engine_for(url: str, **overrides: Any) -> OpenAIForwardEngine:
    settings: dict[str, Any] = {"upstream_url": url, "max_retries": 3, "request_timeout": 5.0}
    settings.update(overrides)
    return OpenAIForwardEngine(OpenAIOptions(**settings), backoff_base=0.001, backoff_cap=0.01)


async def answer(engine: OpenAIForwardEngine) -> Any:
    await engine.start()
    try:
        return await engine.handle(EngineRequest("/v1/chat/completions", {"model": "m", "messages": []}))
    finally:
        await engine.aclose()


def error_of(body: Any) -> dict[str, Any]:
    return (orjson.loads(body) if isinstance(body, bytes) else body)["error"]


def test_https_upstream_with_a_ca_from_ssl_cert_file(
    tls_upstream: TLSUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))
    before = tls_upstream.app.hits
    resp = asyncio.run(answer(engine_for(f"https://localhost:{tls_upstream.port}/v1")))
    assert (resp.status_code, resp.body) == (200, ANSWER)
    assert tls_upstream.app.hits == before + 1


def test_untrusted_certificate_is_final_and_not_retried(tls_upstream: TLSUpstream) -> None:
    # Without SSL_CERT_FILE the engine trusts certifi's bundle only, which lacks the test CA.
    async def go() -> tuple[Any, int]:
        async with LoopbackProxy(tls_upstream.port, relay=True) as relay:
            port = relay.url.rsplit(":", 1)[1]
            resp = await answer(engine_for(f"https://127.0.0.1:{port}/v1", max_retries=3))
            return resp, relay.connections

    before = tls_upstream.app.hits
    resp, connections = asyncio.run(go())
    assert resp.status_code == 502
    error = error_of(resp.body)
    assert error["code"] == "upstream_tls_error"
    assert "certificate" in error["message"] and "SSL_CERT_FILE" in error["message"]
    assert connections == 1  # one handshake, no retries
    assert tls_upstream.app.hits == before


def test_certificate_for_another_host_is_final(tls_upstream: TLSUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    # A trusted certificate that does not name the host: the name check fails, not the chain.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))

    async def go() -> tuple[Any, list[str]]:
        async with LoopbackProxy(tls_upstream.port) as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            resp = await answer(engine_for("https://other.test/v1", max_retries=3))
            return resp, proxy.requests

    resp, requests = asyncio.run(go())
    assert resp.status_code == 502
    error = error_of(resp.body)
    assert error["code"] == "upstream_tls_error"
    assert "other.test" in error["message"]
    assert requests == ["CONNECT other.test:443 HTTP/1.1"]  # once: not retried


def test_http_upstream_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = Counting()

    async def go(port: int) -> tuple[Any, list[str]]:
        async with LoopbackProxy(port) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            resp = await answer(engine_for("http://upstream.test/v1"))
            return resp, proxy.requests

    with serve_app(plain, log_level="error", lifespan="off") as root:
        resp, requests = asyncio.run(go(int(root.rsplit(":", 1)[1])))
    assert (resp.status_code, resp.body) == (200, ANSWER)
    assert requests == ["POST http://upstream.test/v1/chat/completions HTTP/1.1"]
    assert plain.hits == 1


def test_https_upstream_through_a_connect_tunnel(tls_upstream: TLSUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))

    async def go() -> tuple[Any, list[str]]:
        async with LoopbackProxy(tls_upstream.port) as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            resp = await answer(engine_for("https://upstream.test:8443/v1"))
            return resp, proxy.requests

    before = tls_upstream.app.hits
    resp, requests = asyncio.run(go())
    assert (resp.status_code, resp.body) == (200, ANSWER)
    assert requests == ["CONNECT upstream.test:8443 HTTP/1.1"]
    assert tls_upstream.app.hits == before + 1


def test_no_proxy_sends_the_request_directly(tls_upstream: TLSUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_upstream.ca_file))

    async def go() -> tuple[Any, int]:
        async with LoopbackProxy(tls_upstream.port) as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "localhost")
            resp = await answer(engine_for(f"https://localhost:{tls_upstream.port}/v1"))
            return resp, proxy.connections

    resp, connections = asyncio.run(go())
    assert (resp.status_code, resp.body) == (200, ANSWER)
    assert connections == 0
