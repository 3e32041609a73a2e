"""The openai engine against a real HTTP upstream on 127.0.0.1.

The upstream is a small ASGI app served by uvicorn in a background thread; each request
says in its body what the upstream should do ("mode") and which call counter it uses
("key"), so tests sharing the server do not disturb each other.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import orjson
import pytest
from fakes._serve import serve_app

from llmbatch import ConfigError
from llmbatch.engines import EngineRequest, OpenAIOptions, Usage, create_engine
from llmbatch.engines._openai import OpenAIForwardEngine, parse_retry_after

CHAT = "/v1/chat/completions"

#: Deliberately odd formatting (spacing, key order, escapes) so that any re-serialisation
#: by the engine would show.
RAW_COMPLETION = (
    b'{"id": "chatcmpl-raw",   "object": "chat.completion", "model":"m",\n'
    b' "choices": [{"index": 0, "message": {"role": "assistant", "content": "caf\xc3\xa9 \\u00e9"},'
    b' "finish_reason": "stop"}],\n'
    b' "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,'
    b' "prompt_tokens_details": {"cached_tokens": 3},'
    b' "completion_tokens_details": {"reasoning_tokens": 2}}}'
)
ERROR_400 = orjson.dumps(
    {"error": {"message": "bad model", "type": "invalid_request_error", "param": "model", "code": None}}
)
ERROR_503 = orjson.dumps({"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}})


def big_answer(size: int) -> bytes:
    """A chat completion of exactly `size` bytes (size >= 100)."""
    head, tail = b'{"id": "big", "object": "chat.completion", "pad": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


class Upstream:
    """An OpenAI-ish ASGI app whose behaviour each request picks with body["mode"]."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            data = {"object": "list", "data": [{"id": "m1", "object": "model", "created": 0, "owned_by": "me"}]}
            await self.respond(send, 200, orjson.dumps(data))
            return
        body = orjson.loads(b"".join(chunks))
        mode, key = body.get("mode", "ok"), body.get("key", "")
        self.calls[key] += 1
        n = self.calls[key]
        k = body.get("k", 0)
        if mode == "ok":
            await self.respond(send, 200, RAW_COMPLETION)
        elif mode == "echo":
            headers = {name.decode(): value.decode() for name, value in scope["headers"]}
            echoed = {"method": scope["method"], "path": scope["path"], "headers": headers, "body": body}
            await self.respond(send, 200, orjson.dumps(echoed))
        elif mode == "429":  # rate limited for the first k calls
            if n <= k:
                await self.respond(send, 429, ERROR_503, [(b"retry-after", b"0")])
            else:
                await self.respond(send, 200, RAW_COMPLETION)
        elif mode == "429ms":  # rate limited once, with a precise wait
            if n <= k:
                await self.respond(send, 429, ERROR_503, [(b"retry-after-ms", b"300")])
            else:
                await self.respond(send, 200, RAW_COMPLETION)
        elif mode == "500":
            if n <= k:
                await self.respond(send, 500, b"Internal Server Error", [], content_type=b"text/plain")
            else:
                await self.respond(send, 200, RAW_COMPLETION)
        elif mode == "503":
            await self.respond(send, 503, ERROR_503, [(b"retry-after", b"0")])
        elif mode == "400":
            await self.respond(send, 400, ERROR_400)
        elif mode == "400html":
            await self.respond(send, 400, b"<html>bad</html>", content_type=b"text/html")
        elif mode == "text200":
            await self.respond(send, 200, b"hello", content_type=b"text/plain")
        elif mode == "hang":
            # Until the client gives up and disconnects, so teardown does not wait on us.
            try:
                await asyncio.wait_for(receive(), 10)
            except TimeoutError:
                pass
        elif mode == "slow":
            self.inflight[key] += 1
            self.max_inflight[key] = max(self.max_inflight[key], self.inflight[key])
            try:
                await asyncio.sleep(0.05)
            finally:
                self.inflight[key] -= 1
            await self.respond(send, 200, RAW_COMPLETION)
        elif mode == "chunked":  # no content-length: uvicorn sends Transfer-Encoding: chunked
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": RAW_COMPLETION[:40], "more_body": True})
            await send({"type": "http.response.body", "body": RAW_COMPLETION[40:]})
        elif mode == "gzip":
            await self.respond(send, 200, gzip.compress(RAW_COMPLETION), [(b"content-encoding", b"gzip")])
        elif mode == "big":  # a JSON answer of body["size"] bytes, with a content-length
            await self.respond(send, 200, big_answer(k))
        elif mode == "bigchunked":  # the same without a length, in pieces
            body_bytes = big_answer(k)
            start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            await send(start)
            for i in range(0, len(body_bytes), 1000):
                await send({"type": "http.response.body", "body": body_bytes[i : i + 1000], "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif mode == "gzipbomb":  # small on the wire, big once decoded
            await self.respond(send, 200, gzip.compress(big_answer(k)), [(b"content-encoding", b"gzip")])
        elif mode == "close":
            await self.respond(send, 200, RAW_COMPLETION, [(b"connection", b"close")])
        else:
            await self.respond(send, 500, b"unknown mode", content_type=b"text/plain")

    @staticmethod
    async def respond(
        send: Any,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"application/json",
    ) -> None:
        all_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": all_headers + (headers or [])})
        await send({"type": "http.response.body", "body": body})


class ServedUpstream:
    def __init__(self, app: Upstream, port: int) -> None:
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServedUpstream]:
    app = Upstream()
    with serve_app(app, log_level="error", lifespan="off", timeout_graceful_shutdown=1) as root:
        yield ServedUpstream(app, int(root.rsplit(":", 1)[1]))


def make_engine(url: str, **overrides: Any) -> OpenAIForwardEngine:
    settings: dict[str, Any] = {"upstream_url": url, "max_retries": 3, "request_timeout": 5.0}
    settings.update(overrides)
    return OpenAIForwardEngine(OpenAIOptions(**settings), backoff_base=0.001, backoff_cap=0.01)


def chat(mode: str = "ok", key: str | None = None, **extra: Any) -> EngineRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "mode": mode, "key": key or uuid.uuid4().hex}
    body.update(extra)
    return EngineRequest(CHAT, body, custom_id="row-1")


def run(engine: OpenAIForwardEngine, *requests: EngineRequest) -> list[Any]:
    """Starts the engine, answers the requests concurrently, closes it."""

    async def go() -> list[Any]:
        await engine.start()
        try:
            return list(await asyncio.gather(*(engine.handle(r) for r in requests)))
        finally:
            await engine.aclose()

    return asyncio.run(go())


def error_of(body: Any) -> dict[str, Any]:
    parsed = orjson.loads(body) if isinstance(body, bytes) else body
    return parsed["error"]


# --- construction -------------------------------------------------------------------------


def test_missing_upstream_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        OpenAIForwardEngine(OpenAIOptions())
    assert str(info.value) == (
        "the openai engine needs --upstream-url "
        "(the base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1)"
    )


def test_registered_as_openai_engine() -> None:
    engine = create_engine("openai", OpenAIOptions(upstream_url="http://127.0.0.1:1/v1", max_concurrency=7))
    assert isinstance(engine, OpenAIForwardEngine)
    assert engine.max_concurrency == 7  # what the batch worker keeps in flight


@pytest.mark.parametrize(
    "endpoint", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"]
)
def test_each_endpoint_goes_to_the_same_path_upstream(upstream: ServedUpstream, endpoint: str) -> None:
    [resp] = run(make_engine(upstream.url), EngineRequest(endpoint, {"model": "m", "mode": "echo"}))
    assert resp.status_code == 200
    assert orjson.loads(resp.body)["path"] == endpoint


# --- success ------------------------------------------------------------------------------


def test_success_passes_bytes_through_unchanged_and_reads_usage(upstream: ServedUpstream) -> None:
    [resp] = run(make_engine(upstream.url), chat("ok"))
    assert resp.status_code == 200
    assert resp.body == RAW_COMPLETION
    assert resp.usage == Usage(input_tokens=11, output_tokens=7, cached_tokens=3, reasoning_tokens=2)


def test_request_path_headers_and_body(upstream: ServedUpstream) -> None:
    engine = make_engine(upstream.url + "/", upstream_api_key="sk-test")
    request = EngineRequest("/v1/embeddings", {"model": "e", "input": "héllo", "mode": "echo"})
    [resp] = run(engine, request)
    echoed = orjson.loads(resp.body)
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/v1/embeddings"
    assert echoed["headers"]["authorization"] == "Bearer sk-test"
    assert echoed["headers"]["content-type"] == "application/json"
    assert echoed["body"] == {"model": "e", "input": "héllo", "mode": "echo"}


def test_no_authorization_header_without_key(upstream: ServedUpstream) -> None:
    [resp] = run(make_engine(upstream.url), chat("echo"))
    assert "authorization" not in orjson.loads(resp.body)["headers"]


def test_chunked_gzip_and_connection_close_answers(upstream: ServedUpstream) -> None:
    engine = make_engine(upstream.url, max_retries=0)
    # Sequential on one engine, so "close" is followed by requests that need a new connection.
    requests = [chat(mode) for mode in ("chunked", "close", "gzip", "close", "ok")]

    async def go() -> list[Any]:
        await engine.start()
        try:
            return [await engine.handle(r) for r in requests]
        finally:
            await engine.aclose()

    for resp in asyncio.run(go()):
        assert (resp.status_code, resp.body) == (200, RAW_COMPLETION)


def test_unknown_endpoint_is_refused_without_calling_upstream() -> None:
    engine = make_engine("http://127.0.0.1:1/v1")
    [resp] = run(engine, EngineRequest("/v1/images/generations", {"model": "m"}))
    assert resp.status_code == 404
    assert error_of(resp.body)["type"] == "invalid_request_error"


# --- retries ------------------------------------------------------------------------------


def test_429_is_retried_then_succeeds(upstream: ServedUpstream) -> None:
    request = chat("429", k=2)
    [resp] = run(make_engine(upstream.url), request)
    assert (resp.status_code, resp.body) == (200, RAW_COMPLETION)
    assert upstream.app.calls[request.body["key"]] == 3


def test_500_is_retried_then_succeeds(upstream: ServedUpstream) -> None:
    request = chat("500", k=1)
    [resp] = run(make_engine(upstream.url), request)
    assert resp.status_code == 200
    assert upstream.app.calls[request.body["key"]] == 2


def test_retry_after_ms_is_honoured(upstream: ServedUpstream) -> None:
    request = chat("429ms", k=1)
    started = time.monotonic()
    [resp] = run(make_engine(upstream.url), request)
    assert resp.status_code == 200
    assert time.monotonic() - started >= 0.3
    assert upstream.app.calls[request.body["key"]] == 2


def test_400_is_not_retried_and_passes_through(upstream: ServedUpstream) -> None:
    request = chat("400")
    [resp] = run(make_engine(upstream.url), request)
    assert resp.status_code == 400
    assert resp.body == ERROR_400
    assert resp.usage is None
    assert upstream.app.calls[request.body["key"]] == 1


def test_non_json_4xx_is_wrapped_in_an_error_envelope(upstream: ServedUpstream) -> None:
    [resp] = run(make_engine(upstream.url), chat("400html"))
    assert resp.status_code == 400
    assert error_of(resp.body) == {"message": "<html>bad</html>", "type": "upstream_error", "param": None, "code": None}


def test_non_json_success_is_a_502(upstream: ServedUpstream) -> None:
    [resp] = run(make_engine(upstream.url), chat("text200"))
    assert resp.status_code == 502
    assert "non-JSON" in error_of(resp.body)["message"]


def test_exhausted_retries_return_last_upstream_answer(upstream: ServedUpstream) -> None:
    request = chat("503")
    [resp] = run(make_engine(upstream.url, max_retries=2), request)
    assert resp.status_code == 503
    assert resp.body == ERROR_503
    assert resp.headers == {"Retry-After": "0"}
    assert upstream.app.calls[request.body["key"]] == 3


def test_exhausted_retries_of_non_json_5xx(upstream: ServedUpstream) -> None:
    request = chat("500", k=100)
    [resp] = run(make_engine(upstream.url, max_retries=1), request)
    assert resp.status_code == 500
    assert error_of(resp.body)["message"] == "Internal Server Error"
    assert upstream.app.calls[request.body["key"]] == 2


def test_timeout_becomes_504_after_retries(upstream: ServedUpstream) -> None:
    request = chat("hang")
    [resp] = run(make_engine(upstream.url, request_timeout=0.3, max_retries=1), request)
    assert resp.status_code == 504
    error = error_of(resp.body)
    assert error["type"] == "timeout"
    assert error["code"] == "upstream_timeout"
    assert error["message"].startswith("upstream timed out after 2 attempts")
    assert upstream.app.calls[request.body["key"]] == 2


def test_unreachable_upstream_becomes_502() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    [resp] = run(make_engine(f"http://127.0.0.1:{port}/v1", max_retries=2), chat())
    assert resp.status_code == 502
    error = error_of(resp.body)
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_unreachable"
    assert "after 3 attempts" in error["message"]


# --- connections and concurrency --------------------------------------------------------------


def test_concurrency_bound_is_honoured(upstream: ServedUpstream) -> None:
    key = uuid.uuid4().hex
    engine = make_engine(upstream.url, max_concurrency=4)
    responses = run(engine, *(chat("slow", key=key) for _ in range(50)))
    assert all(r.status_code == 200 for r in responses)
    assert upstream.app.calls[key] == 50
    assert upstream.app.max_inflight[key] == 4


def test_retries_wait_outside_the_concurrency_bound(upstream: ServedUpstream) -> None:
    # One slot: a row sleeping before its retry must not block the other row.
    engine = OpenAIForwardEngine(
        OpenAIOptions(upstream_url=upstream.url, max_concurrency=1, max_retries=1), backoff_base=0.6, backoff_cap=0.6
    )
    fast = chat("ok")
    slow = chat("500", k=1)

    async def go() -> float:
        await engine.start()
        try:
            slow_task = asyncio.create_task(engine.handle(slow))
            await asyncio.sleep(0.1)  # slow has failed once and is backing off (>= 0.3 s)
            started = time.monotonic()
            assert (await engine.handle(fast)).status_code == 200
            elapsed = time.monotonic() - started
            assert (await slow_task).status_code == 200
            return elapsed
        finally:
            await engine.aclose()

    assert asyncio.run(go()) < 0.2


async def _serve_raw(handler: Any) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


def _ok_head(length: int = len(RAW_COMPLETION)) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length


def _answer_then_drop_the_reuse(posts: list[int]) -> Any:
    """A server that answers a connection's first POST, then drops the connection unanswered
    when the client reuses it: the race of a keep-alive connection closed by the server just as
    the client sends on it. `posts` counts the POSTs that reached it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        posts.append(1)
        writer.write(_ok_head() + RAW_COMPLETION)
        await writer.drain()
        try:
            await _read_request(reader)  # the reuse: the upstream got it, and may have billed it
            posts.append(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return handler


def test_post_on_a_dropped_keep_alive_connection_is_not_resent_silently() -> None:
    posts: list[int] = []

    async def go() -> list[Any]:
        server, port = await _serve_raw(_answer_then_drop_the_reuse(posts))
        engine = make_engine(f"http://127.0.0.1:{port}/v1", max_retries=0)
        await engine.start()
        try:
            return [await engine.handle(chat()) for _ in range(3)]
        finally:
            await engine.aclose()
            server.close()

    first, second, third = asyncio.run(go())
    assert (first.status_code, first.body) == (200, RAW_COMPLETION)
    assert second.status_code == 502  # the upstream got it once; nothing sent it again
    assert error_of(second.body)["code"] == "upstream_unreachable"
    assert (third.status_code, third.body) == (200, RAW_COMPLETION)
    assert len(posts) == 3


def test_post_on_a_dropped_keep_alive_connection_is_an_attempt_of_the_retry_policy() -> None:
    posts: list[int] = []

    async def go() -> list[Any]:
        server, port = await _serve_raw(_answer_then_drop_the_reuse(posts))
        engine = make_engine(f"http://127.0.0.1:{port}/v1", max_retries=1)
        await engine.start()
        try:
            return [await engine.handle(chat()) for _ in range(2)]
        finally:
            await engine.aclose()
            server.close()

    responses = asyncio.run(go())
    assert [(r.status_code, r.body) for r in responses] == [(200, RAW_COMPLETION)] * 2
    assert len(posts) == 3  # the dropped send counted as the second row's first attempt


def test_connection_closed_by_the_server_while_idle_is_not_reused() -> None:
    posts: list[int] = []
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await _read_request(reader)
        posts.append(1)
        writer.write(_ok_head() + RAW_COMPLETION)  # keep-alive by default in HTTP/1.1...
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # ...then an idle timeout far shorter than the client's

    async def go() -> list[Any]:
        server, port = await _serve_raw(handler)
        engine = make_engine(f"http://127.0.0.1:{port}/v1", max_retries=0)
        await engine.start()
        try:
            first = await engine.handle(chat())
            await asyncio.sleep(0.3)
            return [first, await engine.handle(chat())]
        finally:
            await engine.aclose()
            server.close()

    responses = asyncio.run(go())
    assert [(r.status_code, r.body) for r in responses] == [(200, RAW_COMPLETION)] * 2
    assert (len(posts), len(connections)) == (2, 2)


def _torn_then_whole(answers: list[bytes], chunked: bool) -> Any:
    """A server that sends half an answer and closes the connection, then whole answers."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        torn = not answers
        answers.append(b"torn" if torn else b"whole")
        if chunked:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            half = RAW_COMPLETION[:50]
            body = b"%x\r\n%s\r\n" % (len(half), half)
            if not torn:
                rest = RAW_COMPLETION[50:]
                body += b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest)
            writer.write(head + body)
        else:
            writer.write(_ok_head() + (RAW_COMPLETION[:50] if torn else RAW_COMPLETION))
        await writer.drain()
        writer.close()

    return handler


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_answer_cut_short_is_retried_never_passed_on(chunked: bool) -> None:
    async def go(max_retries: int) -> tuple[Any, list[bytes]]:
        answers: list[bytes] = []
        server, port = await _serve_raw(_torn_then_whole(answers, chunked))
        engine = make_engine(f"http://127.0.0.1:{port}/v1", max_retries=max_retries)
        await engine.start()
        try:
            return await engine.handle(chat()), answers
        finally:
            await engine.aclose()
            server.close()

    resp, answers = asyncio.run(go(max_retries=0))
    assert resp.status_code == 502
    assert error_of(resp.body)["code"] == "upstream_unreachable"
    assert answers == [b"torn"]
    resp, answers = asyncio.run(go(max_retries=1))
    assert (resp.status_code, resp.body) == (200, RAW_COMPLETION)
    assert answers == [b"torn", b"whole"]


@pytest.mark.parametrize("mode", ["big", "bigchunked", "gzipbomb"])
def test_answer_over_the_size_cap_is_a_final_error(upstream: ServedUpstream, mode: str) -> None:
    cap = 64 * 1024
    engine = OpenAIForwardEngine(
        OpenAIOptions(upstream_url=upstream.url, max_retries=3), backoff_base=0.001, max_response_bytes=cap
    )
    over, at_cap = chat(mode, k=cap + 1), chat(mode, k=cap)
    [refused, passed] = run(engine, over, at_cap)
    assert refused.status_code == 502
    error = error_of(refused.body)
    assert error["code"] == "upstream_response_too_large"
    assert "65,536-byte cap" in error["message"]
    assert upstream.app.calls[over.body["key"]] == 1  # not retried
    assert (passed.status_code, passed.body) == (200, big_answer(cap))


def test_body_delimited_by_connection_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        writer.write(RAW_COMPLETION)
        await writer.drain()
        writer.close()

    async def go() -> list[Any]:
        server, port = await _serve_raw(handler)
        engine = make_engine(f"http://127.0.0.1:{port}/v1", max_retries=0)
        await engine.start()
        try:
            return [await engine.handle(chat()) for _ in range(2)]
        finally:
            await engine.aclose()
            server.close()

    assert [(r.status_code, r.body) for r in asyncio.run(go())] == [(200, RAW_COMPLETION)] * 2


# --- models -------------------------------------------------------------------------------


def test_list_models(upstream: ServedUpstream) -> None:
    engine = make_engine(upstream.url)

    async def go() -> list[dict[str, Any]]:
        await engine.start()
        try:
            return await engine.list_models()
        finally:
            await engine.aclose()

    assert [m["id"] for m in asyncio.run(go())] == ["m1"]


def test_list_models_of_unreachable_upstream_is_empty() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    engine = make_engine(f"http://127.0.0.1:{port}/v1")

    async def go() -> list[dict[str, Any]]:
        try:
            return await engine.list_models()
        finally:
            await engine.aclose()

    assert asyncio.run(go()) == []


# --- parse_retry_after ----------------------------------------------------------------------


def test_parse_retry_after_seconds_and_ms() -> None:
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "0"}) == 0.0
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": " 1.5 "}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    # the precise header wins
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "junk", "retry-after": "1"}) == 1.0


def test_parse_retry_after_http_date() -> None:
    later = parse_retry_after({"retry-after": formatdate(time.time() + 30, usegmt=True)})
    assert later is not None and 28 <= later <= 31
    assert parse_retry_after({"retry-after": formatdate(time.time() - 30, usegmt=True)}) == 0.0


def test_parse_retry_after_rejects_garbage() -> None:
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({"retry-after-ms": "-1"}) is None
