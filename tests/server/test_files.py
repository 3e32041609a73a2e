"""The Files API through the official openai SDK (and httpx for bodies the SDK cannot send)."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import openai
import pytest

from conftest import chat_line, jsonl, upload, wait_batch

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_envelope(resp: httpx.Response, status: int, **expected: Any) -> dict[str, Any]:
    """The response is OpenAI's error envelope with this status; `expected` pins some of its fields."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    for key, value in expected.items():
        assert body["error"][key] == value, body
    return body["error"]


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "llmbatch-boundary") -> tuple[bytes, str]:
    """A hand-built multipart/form-data body: (name, filename or None, content) per part."""
    out = bytearray()
    for name, filename, content in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


# -- upload, retrieve, content -------------------------------------------------------------


def test_upload_returns_file_object(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(i) for i in range(3)])
    before = int(time.time())
    f = upload(client, data, name="my-input.jsonl")
    after = int(time.time())
    assert f.id.startswith("file-")
    assert f.object == "file"
    assert f.bytes == len(data)
    assert before <= f.created_at <= after
    assert f.filename == "my-input.jsonl"
    assert f.purpose == "batch"
    assert f.status == "processed"
    assert f.expires_at is None


def test_unicode_filename_kept(client: openai.OpenAI) -> None:
    f = upload(client, b"{}\n", name="données ✓ batch.jsonl", purpose="user_data")
    assert f.filename == "données ✓ batch.jsonl"
    assert client.files.retrieve(f.id).filename == "données ✓ batch.jsonl"


def test_retrieve_matches_upload(client: openai.OpenAI) -> None:
    f = upload(client, b"some user data\n", name="notes.txt", purpose="user_data")
    got = client.files.retrieve(f.id)
    assert got.model_dump() == f.model_dump()
    assert got.purpose == "user_data"
    assert got.filename == "notes.txt"


def test_content_round_trip_byte_for_byte(client: openai.OpenAI) -> None:
    # Every byte value, CRLF, NUL, no trailing newline: nothing may be normalised.
    data = bytes(range(256)) * 4 + b"\r\nline\r\n\x00end"
    f = upload(client, data, name="blob.bin", purpose="user_data")
    assert f.bytes == len(data)
    assert client.files.content(f.id).content == data


def test_large_file_round_trip(client: openai.OpenAI) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    f = upload(client, data, name="big.bin", purpose="user_data")
    assert f.bytes == len(data)
    assert client.files.retrieve(f.id).bytes == len(data)
    got = client.files.content(f.id).content
    assert len(got) == len(data)
    assert got == data


def test_content_of_a_batch_file_round_trips(client: openai.OpenAI) -> None:
    data = jsonl([chat_line(i, text=f"héllo wörld {i} ✓") for i in range(20)])
    f = upload(client, data)
    assert client.files.content(f.id).content == data


# -- list ----------------------------------------------------------------------------------


def test_list_purpose_filter(client: openai.OpenAI) -> None:
    batch_file = upload(client, jsonl([chat_line(0)]))
    user_file = upload(client, b"x", name="u.txt", purpose="user_data")

    user_ids = [f.id for f in client.files.list(purpose="user_data")]
    assert user_file.id in user_ids
    assert batch_file.id not in user_ids
    assert all(f.purpose == "user_data" for f in client.files.list(purpose="user_data"))

    batch_ids = [f.id for f in client.files.list(purpose="batch")]
    assert batch_file.id in batch_ids
    assert user_file.id not in batch_ids

    all_ids = [f.id for f in client.files.list()]
    assert {batch_file.id, user_file.id} <= set(all_ids)
    assert list(client.files.list(purpose="no-such-purpose")) == []


def _page_extra(page: Any, name: str) -> Any:
    """first_id / last_id: not declared by the SDK's page model, kept as extra fields."""
    value = getattr(page, name, None)
    if value is None and page.model_extra:
        value = page.model_extra.get(name)
    return value


def test_list_order_and_pagination(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory()
    client = srv.client()
    ids = [upload(client, jsonl([chat_line(i)]), name=f"f{i}.jsonl").id for i in range(7)]
    newest_first = ids[::-1]

    # order
    assert [f.id for f in client.files.list()] == newest_first  # default: desc
    assert [f.id for f in client.files.list(order="desc")] == newest_first
    assert [f.id for f in client.files.list(order="asc")] == ids

    # manual pages, limit 3
    for order, expected in (("desc", newest_first), ("asc", ids)):
        seen: list[str] = []
        pages = []
        after: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": 3, "order": order}
            if after is not None:
                kwargs["after"] = after
            page = client.files.list(**kwargs)
            page_ids = [f.id for f in page.data]
            pages.append(page_ids)
            assert 0 < len(page_ids) <= 3
            assert _page_extra(page, "first_id") == page_ids[0]
            assert _page_extra(page, "last_id") == page_ids[-1]
            seen += page_ids
            if not page.has_more:
                break
            assert len(page_ids) == 3
            after = page_ids[-1]
            assert len(pages) < 10, "pagination does not end"
        assert [len(p) for p in pages] == [3, 3, 1]
        assert seen == expected
        assert len(set(seen)) == 7

    # the raw page, including first_id / last_id, as OpenAI sends it
    raw = srv.http().get("/v1/files", params={"limit": 3, "after": newest_first[2]}).json()
    assert raw["object"] == "list"
    assert [f["id"] for f in raw["data"]] == newest_first[3:6]
    assert raw["first_id"] == newest_first[3] and raw["last_id"] == newest_first[5]
    assert raw["has_more"] is True
    last = srv.http().get("/v1/files", params={"limit": 3, "after": newest_first[5]}).json()
    assert [f["id"] for f in last["data"]] == newest_first[6:]
    assert last["has_more"] is False

    # the SDK's auto-pagination follows `after` across pages
    assert [f.id for f in client.files.list(limit=3)] == newest_first
    assert [f.id for f in client.files.list(limit=3, order="asc")] == ids
    assert [f.id for f in client.files.list(limit=1)] == newest_first

    # a page size that divides the count exactly ends with has_more False, not an empty page
    page = client.files.list(limit=7)
    assert len(page.data) == 7 and page.has_more is False


def test_list_rejects_bad_parameters(server) -> None:  # type: ignore[no-untyped-def]
    http = server.http()
    assert_envelope(http.get("/v1/files", params={"order": "sideways"}), 400, param="order")
    assert_envelope(http.get("/v1/files", params={"limit": "0"}), 400, param="limit")
    assert_envelope(http.get("/v1/files", params={"limit": "abc"}), 400, param="limit")
    assert_envelope(http.get("/v1/files", params={"after": "file-doesnotexist"}), 400, param="after")


# -- delete --------------------------------------------------------------------------------


def test_delete(client: openai.OpenAI) -> None:
    f = upload(client, jsonl([chat_line(0)]))
    deleted = client.files.delete(f.id)
    assert deleted.id == f.id
    assert deleted.object == "file"
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(f.id)
    assert f.id not in [x.id for x in client.files.list()]


def test_delete_raw_body(server) -> None:  # type: ignore[no-untyped-def]
    f = upload(server.client(), b"abc", purpose="user_data")
    r = server.http().delete(f"/v1/files/{f.id}")
    assert r.status_code == 200
    assert r.json() == {"id": f.id, "object": "file", "deleted": True}


# -- errors --------------------------------------------------------------------------------


def test_unknown_file_id(client: openai.OpenAI, server) -> None:  # type: ignore[no-untyped-def]
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            call("file-doesnotexist")
        assert exc.value.status_code == 404
        assert exc.value.code == "file_not_found"
        assert "file-doesnotexist" in exc.value.message
    assert_envelope(server.http().get("/v1/files/file-doesnotexist"), 404, code="file_not_found")


def test_invalid_purpose(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, b"data", purpose="bogus")
    assert exc.value.param == "purpose"
    assert exc.value.status_code == 400


def test_missing_file_part(server) -> None:  # type: ignore[no-untyped-def]
    body, ctype = multipart([("purpose", None, b"batch")])
    r = server.http().post("/v1/files", content=body, headers={"content-type": ctype})
    assert_envelope(r, 400, param="file")


def test_missing_purpose(server) -> None:  # type: ignore[no-untyped-def]
    body, ctype = multipart([("file", "a.jsonl", jsonl([chat_line(0)]))])
    r = server.http().post("/v1/files", content=body, headers={"content-type": ctype})
    assert_envelope(r, 400, param="purpose")


def test_malformed_upload_bodies(server) -> None:  # type: ignore[no-untyped-def]
    http = server.http()
    before = {f["id"] for f in http.get("/v1/files").json()["data"]}
    # not multipart at all
    assert_envelope(http.post("/v1/files", json={"purpose": "batch"}), 400)
    # multipart without a boundary parameter
    assert_envelope(http.post("/v1/files", content=b"x", headers={"content-type": "multipart/form-data"}), 400)
    # garbage that does not start with the boundary
    r = http.post(
        "/v1/files", content=b"this is not multipart", headers={"content-type": "multipart/form-data; boundary=zz"}
    )
    assert_envelope(r, 400)
    # truncated: the closing boundary never comes
    body, ctype = multipart([("purpose", None, b"batch"), ("file", "a.jsonl", b"{}\n")])
    assert_envelope(http.post("/v1/files", content=body[:-8], headers={"content-type": ctype}), 400)
    # ... even when everything but the closing boundary arrived
    cut = body.rindex(b"\r\n--")
    assert_envelope(http.post("/v1/files", content=body[:cut], headers={"content-type": ctype}), 400)
    # the complete body is fine
    r = http.post("/v1/files", content=body, headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    assert http.get(f"/v1/files/{r.json()['id']}/content").content == b"{}\n"
    assert server.proc.poll() is None
    assert {f["id"] for f in http.get("/v1/files").json()["data"]} == before | {r.json()["id"]}


def test_empty_batch_file_rejected(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, b"", name="empty.jsonl")
    assert exc.value.code == "empty_file"
    assert exc.value.param == "file"
    assert "empty.jsonl" not in [f.filename for f in client.files.list(purpose="batch")]


def test_file_size_limit(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--max-file-size", "1000")
    client = srv.client()
    ok = upload(client, b"a" * 1000, name="exactly.txt", purpose="user_data")
    assert ok.bytes == 1000

    with pytest.raises(openai.APIStatusError) as exc:
        upload(client, b"b" * 1001, name="too-big.txt", purpose="user_data")
    assert exc.value.status_code == 413
    assert exc.value.code == "file_too_large"
    body = exc.value.body
    assert isinstance(body, dict) and set(body) == ERROR_KEYS

    with pytest.raises(openai.APIStatusError) as exc:
        upload(client, os.urandom(200_000), name="much-too-big.jsonl")
    assert exc.value.status_code == 413
    assert exc.value.code == "file_too_large"

    assert [f.id for f in client.files.list()] == [ok.id]
    assert srv.proc.poll() is None
    # the limit did not break later uploads
    assert upload(client, b"c" * 10, purpose="user_data").bytes == 10


def test_expires_after(client: openai.OpenAI) -> None:
    f = client.files.create(
        file=("exp.jsonl", jsonl([chat_line(0)])),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert f.expires_at is not None
    assert abs(f.expires_at - (f.created_at + 3600)) <= 1
    assert client.files.retrieve(f.id).expires_at == f.expires_at

    longest = client.files.create(
        file=("exp2.txt", b"x"), purpose="user_data", expires_after={"anchor": "created_at", "seconds": 2_592_000}
    )
    assert longest.expires_at is not None
    assert abs(longest.expires_at - (longest.created_at + 2_592_000)) <= 1


@pytest.mark.parametrize("seconds", [3599, 2_592_001, 0, -5])
def test_expires_after_out_of_range(client: openai.OpenAI, seconds: int) -> None:
    name = f"bad-expiry-{seconds}.jsonl"
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(
            file=(name, jsonl([chat_line(0)])),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": seconds},
        )
    assert exc.value.param == "expires_after"
    assert name not in [f.filename for f in client.files.list()]


def test_delete_input_of_running_batch_conflicts(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--echo-latency", "0.5")
    client = srv.client()
    f = upload(client, jsonl([chat_line(i) for i in range(4)]))
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.ConflictError) as exc:
        client.files.delete(f.id)
    assert exc.value.status_code == 409
    assert exc.value.code == "file_in_use"
    assert batch.id in exc.value.message
    # still there and intact
    assert client.files.retrieve(f.id).id == f.id

    done = wait_batch(client, batch.id, timeout=30)
    assert done.status == "completed"
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
