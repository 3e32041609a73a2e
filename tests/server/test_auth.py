"""API keys: requests without a valid key are refused, and each key sees only its own objects."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import ServerProc, chat_line, free_port, jsonl, upload, wait_batch

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """A server accepting key-a and key-b, shared by this module's tests (slow rows, so batches run a while)."""
    base: Path = tmp_path_factory.mktemp("keyed-server")
    srv = ServerProc(
        port=free_port(),
        data_dir=base / "data",
        args=["--api-key", "key-a", "--api-key", "key-b", "--echo-latency", "0.2", "--max-concurrency", "2"],
        log_path=base / "server.log",
        keys=["key-a", "key-b"],
    )
    srv.start()
    yield srv
    srv.stop()


#: Per-request headers that make the SDK send no Authorization header at all.
NO_AUTH: dict[str, Any] = {"Authorization": openai.Omit()}


def raw(srv: ServerProc, headers: dict[str, str] | None = None) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", headers=headers or {}, timeout=30)


def assert_401(exc: pytest.ExceptionInfo[Any]) -> None:
    assert exc.value.status_code == 401
    assert exc.value.code == "invalid_api_key"
    assert isinstance(exc.value.body, dict) and set(exc.value.body) == {"message", "type", "param", "code"}


def test_no_key_is_refused(keyed: ServerProc) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        keyed.client().files.list(extra_headers=NO_AUTH)
    assert_401(exc)
    assert "didn't provide an API key" in exc.value.message
    # the header really was absent: same answer from a bare request
    r = raw(keyed).get("/v1/files")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "auth",
    ["Bearer key-c", "Bearer key-a-but-longer", "Bearer KEY-A", "Basic key-a", "key-a", "Bearer", "Bearerkey-a"],
)
def test_wrong_key_is_refused(keyed: ServerProc, auth: str) -> None:
    r = raw(keyed, {"Authorization": auth}).get("/v1/files")
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_wrong_key_through_sdk(keyed: ServerProc) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        keyed.client("not-a-key").batches.list()
    assert_401(exc)
    assert "Incorrect API key" in exc.value.message


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/files"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files/file-x"),
        ("GET", "/v1/files/file-x/content"),
        ("DELETE", "/v1/files/file-x"),
        ("GET", "/v1/batches"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches/batch_x"),
        ("POST", "/v1/batches/batch_x/cancel"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/echo"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/moderations"),
    ],
)
def test_every_api_route_needs_a_key(keyed: ServerProc, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = raw(keyed, headers).request(method, path, json={"model": "echo"})
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_health_needs_no_key(keyed: ServerProc) -> None:
    assert raw(keyed).get("/health").status_code == 200


def test_direct_endpoints_and_models_with_keys(keyed: ServerProc) -> None:
    for key in ("key-a", "key-b"):
        client = keyed.client(key)
        reply = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hi"
        assert "echo" in [m.id for m in client.models.list()]
        assert client.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.AuthenticationError):
        keyed.client().chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}], extra_headers=NO_AUTH
        )
    with pytest.raises(openai.AuthenticationError):
        keyed.client().models.list(extra_headers=NO_AUTH)
    with pytest.raises(openai.AuthenticationError):
        keyed.client("nope").embeddings.create(model="echo", input="x")


def test_keys_see_only_their_own_objects(keyed: ServerProc) -> None:
    a, b = keyed.client("key-a"), keyed.client("key-b")
    data = jsonl([chat_line(i) for i in range(20)])
    fa = upload(a, data)
    batch_a = a.batches.create(input_file_id=fa.id, endpoint=CHAT, completion_window="24h")
    fb = upload(b, jsonl([chat_line(0)]))

    # key-a sees its own
    assert a.files.retrieve(fa.id).id == fa.id
    assert a.files.content(fa.id).content == data
    assert a.batches.retrieve(batch_a.id).id == batch_a.id
    assert fa.id in [f.id for f in a.files.list()]
    assert batch_a.id in [x.id for x in a.batches.list()]

    # ... and key-b sees none of it
    for call in (b.files.retrieve, b.files.content, b.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            call(fa.id)
        assert exc.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch_a.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.cancel(batch_a.id)
    b_files = [f.id for f in b.files.list()]
    assert fa.id not in b_files and fb.id in b_files
    assert batch_a.id not in [x.id for x in b.batches.list()]
    assert fb.id not in [f.id for f in a.files.list()]
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(fb.id)

    # key-b cannot run a batch on key-a's file
    with pytest.raises(openai.NotFoundError) as exc:
        b.batches.create(input_file_id=fa.id, endpoint=CHAT, completion_window="24h")
    assert exc.value.param == "input_file_id"

    # a cursor naming another key's object is not a way in either
    with pytest.raises(openai.BadRequestError):
        b.files.list(after=fa.id)
    with pytest.raises(openai.BadRequestError):
        b.batches.list(after=batch_a.id)

    # key-b's failed attempts changed nothing: the batch still runs and key-a can cancel it
    running = a.batches.retrieve(batch_a.id)
    assert running.status in ("validating", "in_progress"), running
    assert a.batches.cancel(batch_a.id).status in ("cancelling", "cancelled")
    done = wait_batch(a, batch_a.id, timeout=20)
    assert done.status == "cancelled"
    assert a.files.retrieve(fa.id).id == fa.id

    # output files belong to the batch's owner
    for fid in (done.output_file_id, done.error_file_id):
        if fid:
            assert a.files.retrieve(fid).purpose == "batch_output"
            with pytest.raises(openai.NotFoundError):
                b.files.content(fid)

    assert a.files.delete(fa.id).deleted is True


def test_open_server_accepts_any_or_no_key(server: ServerProc) -> None:
    callers = ((server.client("anything"), {}), (server.client("another-key"), {}), (server.client(), NO_AUTH))
    for client, headers in callers:
        assert "echo" in [m.id for m in client.models.list(extra_headers=headers)]
        reply = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "open"}], extra_headers=headers
        )
        assert reply.choices[0].message.content == "open"
    r = raw(server).get("/v1/files")
    assert r.status_code == 200
    # on an open server every caller is the same owner
    f = upload(server.client("one-key"), b"shared", purpose="user_data")
    assert server.client("other-key").files.retrieve(f.id).id == f.id
    assert raw(server).get(f"/v1/files/{f.id}/content").content == b"shared"


@pytest.mark.parametrize("key", ["", "   ", " padded"], ids=["empty", "blank", "padded"])
def test_a_key_that_would_let_anyone_in_is_refused_at_startup(tmp_path: Path, key: str) -> None:
    """With an empty key configured, `Authorization: Bearer ` (nothing after it) would match it."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmbatch", "serve", "--engine", "echo", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data"), "--api-key", "real-key", "--api-key", key],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "--api-key" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
