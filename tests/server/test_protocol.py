"""Protocol-level failures: malformed bodies get OpenAI's JSON envelope, a caller hanging up
mid-body is one info line (not an internal error), and trailing slashes do not bypass auth."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import ServerProc

KEY = "sk-protocol"


def send_raw(srv: ServerProc, data: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(data)
        if not read:
            time.sleep(0.3)  # let the server start reading the body before the hang-up
            return b""
        return s.recv(65536)


def test_trailing_slash_without_a_key_is_401_not_a_redirect(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(keys=[KEY])
    with srv.http(api_key="wrong") as http:
        http.headers.pop("Authorization")
        for path in ("/v1/files/", "/v1/batches/", "/v1/models/"):
            r = http.get(path)
            assert r.status_code == 401, (path, r.status_code, r.headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    with srv.http() as http:  # with the key, both forms work
        for path in ("/v1/files", "/v1/files/", "/v1/batches", "/v1/batches/"):
            r = http.get(path)
            assert r.status_code == 200, (path, r.status_code)
            assert r.json()["object"] == "list"
        r = http.post("/v1/chat/completions/", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200


@pytest.mark.parametrize(
    ("path", "headers", "body"),
    [
        ("/v1/batches", {}, b'{"input_file_id": '),
        ("/v1/batches", {}, b"[1, 2]"),
        ("/v1/chat/completions", {}, b"{nope"),
        ("/v1/files", {"content-type": "multipart/form-data; boundary=xyz"}, b"--xyz\r\ngarbage"),
        ("/v1/files", {"content-type": "application/json"}, b"{}"),
    ],
)
def test_malformed_bodies_get_the_json_envelope(server, path: str, headers: dict[str, str], body: bytes) -> None:  # type: ignore[no-untyped-def]
    with server.http() as http:
        r = http.post(path, content=body, headers=headers)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_client_hanging_up_mid_body_is_not_an_internal_error(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory()
    head = "POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n{}\r\n"
    multipart = "Content-Type: multipart/form-data; boundary=xyz\r\n"
    send_raw(srv, head.format("/v1/batches", "").encode() + b'{"input_file_id": "f', read=False)
    send_raw(srv, head.format("/v1/chat/completions", "").encode() + b'{"model": "m', read=False)
    part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"a": 1}\n'
    send_raw(srv, head.format("/v1/files", multipart).encode() + part, read=False)
    deadline = time.monotonic() + 5
    while srv.log().count("client disconnected") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    log = srv.log()
    assert log.count("client disconnected") == 3, log
    assert "Traceback" not in log and "internal error" not in log and "Exception in ASGI" not in log, log
    with srv.http() as http:  # and the server is fine
        assert http.get("/v1/files").status_code == 200
