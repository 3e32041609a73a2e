"""The dashboard's pages over real HTTP: each key sees exactly what the API shows it, a browser
signs in through an HttpOnly SameSite=Strict cookie, buttons need a CSRF token, pages page."""

from __future__ import annotations

import re

import httpx

from conftest import chat_line, jsonl, run_batch, upload, wait_batch

A, B = "sk-dash-a", "sk-dash-b"


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert m, html
    return m[1]


def test_keys_sign_in_by_cookie_and_see_only_their_own_batches_and_files(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory(keys=[A, B])
    mine = run_batch(srv.client(api_key=A), [chat_line(1)], metadata={"note": "<script>alert(1)</script>"})
    theirs = run_batch(srv.client(api_key=B), [chat_line(2)])
    base = f"http://127.0.0.1:{srv.port}"
    with httpx.Client(base_url=base, timeout=30) as browser:
        r = browser.get("/ui")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
        for path in (f"/ui/batches/{theirs.id}", f"/ui/files/{theirs.output_file_id}", "/ui/fragments/batches"):
            assert browser.get(path).status_code == 303, path  # nothing without a key, not even a 404
        assert browser.post("/ui/login", data={"key": "sk-wrong"}).status_code == 401
        r = browser.post("/ui/login", data={"key": A, "next": "https://evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/ui"  # never sent to another site
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict"), cookie
        page = browser.get("/ui")
        assert page.status_code == 200 and mine.id in page.text and theirs.id not in page.text
        assert page.headers["cache-control"] == "no-store"
        own = browser.get(f"/ui/batches/{mine.id}")
        assert own.status_code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in own.text
        assert "<script>alert" not in own.text
        assert (
            browser.get(f"/ui/files/{mine.output_file_id}").content
            == srv.client(api_key=A).files.content(mine.output_file_id).content
        )
        assert browser.get(f"/ui/batches/{theirs.id}").status_code == 404
        assert browser.get(f"/ui/files/{theirs.output_file_id}").status_code == 404
        assert browser.get(f"/ui/files/{theirs.input_file_id}").status_code == 404
    # Scripts: the Bearer header, like the API; a wrong one is refused, not sent to sign in.
    with srv.http(api_key=B) as script:
        r = script.get("/ui")
        assert r.status_code == 200 and theirs.id in r.text and mine.id not in r.text
        assert script.get("/ui", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_cancel_needs_the_pages_csrf_token_from_a_cookie_and_none_with_a_header(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--echo-latency", "0.2", "--max-concurrency", "1", keys=[A, B])
    client = srv.client(api_key=A)
    ids = []
    for _ in range(2):
        f = upload(client, jsonl([chat_line(i) for i in range(50)]))
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        ids.append(b.id)
    base = f"http://127.0.0.1:{srv.port}"
    with httpx.Client(base_url=base, timeout=30) as browser, httpx.Client(base_url=base, timeout=30) as other:
        browser.post("/ui/login", data={"key": A})
        other.post("/ui/login", data={"key": B})
        token = csrf_of(browser.get(f"/ui/batches/{ids[0]}").text)
        other_token = csrf_of(other.get("/ui").text)  # B's page's token (the sign-out form)
        assert browser.post(f"/ui/batches/{ids[0]}/cancel").status_code == 403
        assert browser.post(f"/ui/batches/{ids[0]}/cancel", data={"csrf": other_token}).status_code == 403
        forged = browser.post(
            f"/ui/batches/{ids[0]}/cancel", data={"csrf": token}, headers={"Origin": "https://evil.example"}
        )
        assert forged.status_code == 403
        assert client.batches.retrieve(ids[0]).status in ("validating", "in_progress")
        assert other.post(f"/ui/batches/{ids[0]}/cancel", data={"csrf": other_token}).status_code == 404
        r = browser.post(f"/ui/batches/{ids[0]}/cancel", data={"csrf": token})
        assert r.status_code == 303, r.text
        assert client.batches.retrieve(ids[0]).status in ("cancelling", "cancelled")
    with srv.http(api_key=A) as script:
        assert script.post(f"/ui/batches/{ids[1]}/cancel").status_code == 303
        assert wait_batch(client, ids[1]).status == "cancelled"
        page = script.get(f"/ui/batches/{ids[1]}").text  # the error file's first lines, with their codes
        assert page.count('<td class="mono">batch_cancelled</td>') == 20 and 'id="cancel"' not in page


def test_the_table_filters_by_status_and_pages_newest_first(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory()  # open: no key, like the API
    client = srv.client()
    done = [run_batch(client, [chat_line(1)]).id for _ in range(2)]
    failed = run_batch(client, b'{"custom_id": "x"}\n')
    assert failed.status == "failed"
    f = upload(client, jsonl([chat_line(1)]))
    # 50 more, enough for a second page (50 a page): created without waiting for each
    ids = [
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(50)
    ]
    with srv.http() as http:
        first = http.get("/ui").text
        shown = re.findall(r'<tr id="row-(batch_\w+)"', first)
        assert shown == ids[::-1]  # newest first, 50 of 53
        older = re.search(r'id="older" href="([^"]+)"', first)
        assert older
        second = http.get(older[1].replace("&amp;", "&")).text
        assert re.findall(r'<tr id="row-(batch_\w+)"', second) == [failed.id, *done[::-1]]
        only_failed = http.get("/ui?status=failed").text
        assert re.findall(r'<tr id="row-(batch_\w+)"', only_failed) == [failed.id]
        assert "invalid_body" in http.get(f"/ui/batches/{failed.id}").text
        assert http.get("/ui?status=bogus").status_code == 400
        assert http.get("/ui/static/htmx.min.js").text.startswith("/*! htmx 2.0.4")
        assert http.get("/ui/static/..%2f_dashboard.py").status_code == 404
