"""A fake of Mistral's Batch API, at the HTTP level, as the `mistralai` SDK (3.x) speaks it.

Routes (base URL = the server root; `Authorization: Bearer KEY` on every call):
- files: `POST /v1/files` (multipart `file`, `purpose`, ...), `GET /v1/files?page&page_size&purpose&search`
  (`{data, object: "list", total}`), `GET|DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`.
- batches: `POST /v1/batch/jobs` (`{input_files, endpoint, model?, metadata?, timeout_hours}`),
  `GET /v1/batch/jobs?page&page_size&created_after` (newest first, `{object, data, total}`),
  `GET /v1/batch/jobs/{id}`, `POST /v1/batch/jobs/{id}/cancel`.
- the direct endpoints `POST /v1/chat/completions`, `/v1/embeddings`, `/v1/moderations`.
Timestamps are Unix integers; the batch names its results `output_file` / `error_file`; errors
are Mistral's flat `{object: "error", message, type, param, code}`.

A batch moves on when polled: QUEUED for `queued_polls` polls, RUNNING for `running_polls`, then
SUCCESS (or TIMEOUT_EXCEEDED with the first half of its rows done, for the next `expire_next`
batches). Each row's answer echoes its last user message, with usage, in shuffled order. Markers
in the last user message: `FAIL400` gives a 400 line in the error file; `FAIL429` a 429 line the
first time its custom_id is seen, success after; `FAILSTR` an error given as a bare string;
`THINK` an answer whose content is a list of chunks (thinking, then text).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._openai_like import OpenAILikeFake, jsonl, user_text

__all__ = ["MistralFake"]

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/moderations", "/v1/fim/completions", "/v1/ocr")


def _text(body: dict[str, Any]) -> str:
    text = user_text(body)
    if text is not None:
        return text
    inp = body.get("input")
    return inp if isinstance(inp, str) else " ".join(inp or [])


def _error(status: int, message: Any, etype: str = "invalid_request_error") -> JSONResponse:
    body = {"object": "error", "message": message, "type": etype, "param": None, "code": None}
    return JSONResponse(body, status_code=status)


@dataclass
class MistralFake(OpenAILikeFake):
    """The fake's state and controls (OpenAILikeFake's and these); `app` is the ASGI app to serve.

    Expired batches stop TIMEOUT_EXCEEDED; calls are recorded with their query ("METHOD /path?query").
    """

    #: Polls a new batch answers QUEUED, then RUNNING, before it ends.
    queued_polls: int = 1
    running_polls: int = 1
    seed: int = 4321

    def __post_init__(self) -> None:
        super().__post_init__()
        self._clock = 0
        routes = Starlette(
            routes=[
                Route("/v1/files", self._upload, methods=["POST"]),
                Route("/v1/files", self._list_files, methods=["GET"]),
                Route("/v1/files/{fid}", self._get_file, methods=["GET"]),
                Route("/v1/files/{fid}", self._delete_file, methods=["DELETE"]),
                Route("/v1/files/{fid}/content", self._content, methods=["GET"]),
                Route("/v1/batch/jobs", self._create_batch, methods=["POST"]),
                Route("/v1/batch/jobs", self._list_batches, methods=["GET"]),
                Route("/v1/batch/jobs/{bid}", self._get_batch, methods=["GET"]),
                Route("/v1/batch/jobs/{bid}/cancel", self._cancel, methods=["POST"]),
                Route("/v1/chat/completions", self._direct, methods=["POST"]),
                Route("/v1/embeddings", self._direct, methods=["POST"]),
                Route("/v1/moderations", self._direct, methods=["POST"]),
            ]
        )

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                query = scope.get("query_string", b"").decode()
                self.calls.append(f"{scope['method']} {scope['path']}" + (f"?{query}" if query else ""))
                headers = dict(scope.get("headers") or [])
                if headers.get(b"authorization", b"").decode() != f"Bearer {self.api_key}":
                    await JSONResponse({"detail": "Unauthorized"}, status_code=401)(scope, receive, send)
                    return
            await routes(scope, receive, send)

        self.app = app

    def _now(self) -> int:
        # Strictly increasing, so "newest first" is well defined within one second.
        self._clock = max(self._clock + 1, int(time.time()))
        return self._clock

    # -- inspection and seeding helpers ------------------------------------------------------

    def batch_list(self) -> list[dict[str, Any]]:
        return sorted(self.batches.values(), key=lambda b: b["created_at"])

    def add_batch(self, *, metadata: dict[str, str] | None = None, input_files: list[str] | None = None) -> str:
        """A finished batch that is not llmbatch's (to fill pages of the listing)."""
        bid = str(uuid.uuid4())
        self.batches[bid] = self._new_job(bid, input_files or [str(uuid.uuid4())], "/v1/chat/completions", metadata)
        self.batches[bid]["status"] = "SUCCESS"
        self.polls[bid] = 0
        return bid

    def add_file(self, name: str, data: bytes, purpose: str = "batch") -> str:
        """A file uploaded by someone else (say, one that fails validation)."""
        return self._add_file(name, purpose, data, "batch_request")

    # -- files -------------------------------------------------------------------------------

    def _add_file(self, name: str, purpose: str, data: bytes, sample_type: str) -> str:
        fid = str(uuid.uuid4())
        self.contents[fid] = data
        self.files[fid] = {
            "id": fid, "object": "file", "bytes": len(data), "created_at": self._now(), "filename": name,
            "purpose": purpose, "sample_type": sample_type, "source": "upload", "num_lines": data.count(b"\n"),
            "mimetype": "application/jsonl", "signature": None,
        }  # fmt: skip
        return fid

    async def _upload(self, request: Request) -> Response:
        form = await request.form()
        upload = form.get("file")
        purpose = form.get("purpose") or "fine-tune"
        if upload is None or isinstance(upload, str):
            return _error(422, "file is required")
        data = await upload.read()
        fid = self._add_file(upload.filename or "upload.jsonl", str(purpose), data, "batch_request")
        return JSONResponse(self.files[fid])

    async def _list_files(self, request: Request) -> Response:
        q = request.query_params
        page, size = int(q.get("page", 0)), int(q.get("page_size", 100))
        found = [
            f for f in sorted(self.files.values(), key=lambda f: -f["created_at"])
            if (not q.get("purpose") or f["purpose"] == q["purpose"]) and (q.get("search") or "") in f["filename"]
        ]  # fmt: skip
        return JSONResponse({"data": found[page * size : (page + 1) * size], "object": "list", "total": len(found)})

    async def _get_file(self, request: Request) -> Response:
        fid = request.path_params["fid"]
        if fid not in self.files:
            return _error(404, "File not found", "not_found_error")
        return JSONResponse({**self.files[fid], "deleted": False})

    async def _delete_file(self, request: Request) -> Response:
        fid = request.path_params["fid"]
        if self.files.pop(fid, None) is None:
            return _error(404, "File not found", "not_found_error")
        self.contents.pop(fid, None)
        return JSONResponse({"id": fid, "object": "file", "deleted": True})

    async def _content(self, request: Request) -> Response:
        fid = request.path_params["fid"]
        if fid not in self.contents:
            return _error(404, "File not found", "not_found_error")
        return Response(self.contents[fid], media_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------

    def _new_job(self, bid: str, files: list[str], endpoint: str, metadata: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": bid, "object": "batch", "input_files": files, "metadata": metadata, "endpoint": endpoint,
            "model": None, "agent_id": None, "output_file": None, "error_file": None, "errors": [],
            "status": "QUEUED", "created_at": self._now(), "total_requests": 0, "completed_requests": 0,
            "succeeded_requests": 0, "failed_requests": 0, "started_at": None, "completed_at": None,
        }  # fmt: skip

    async def _create_batch(self, request: Request) -> Response:
        req = await request.json()
        if req.get("endpoint") not in ENDPOINTS:
            return _error(422, f"unsupported endpoint {req.get('endpoint')!r}")
        files = req.get("input_files") or []
        missing = [f for f in files if f not in self.files]
        if not files or missing:
            return _error(404, f"input files not found: {missing}", "not_found_error")
        bid = str(uuid.uuid4())
        self.batches[bid] = self._new_job(bid, files, req["endpoint"], req.get("metadata"))
        self.batches[bid]["model"] = req.get("model")
        self.polls[bid] = 0
        if self.lose_create_answers > 0:
            self.lose_create_answers -= 1
            return _error(500, "Internal server error", "api_error")
        return JSONResponse(self.batches[bid])

    async def _list_batches(self, request: Request) -> Response:
        q = request.query_params
        page, size = int(q.get("page", 0)), int(q.get("page_size", 100))
        after = q.get("created_after")
        since = datetime.fromisoformat(after.replace("Z", "+00:00")).timestamp() if after else 0
        found = [b for b in reversed(self.batch_list()) if b["created_at"] >= since]
        return JSONResponse({"object": "list", "data": found[page * size : (page + 1) * size], "total": len(found)})

    async def _get_batch(self, request: Request) -> Response:
        bid = request.path_params["bid"]
        b = self.batches.get(bid)
        if b is None:
            return _error(404, "Batch job not found", "not_found_error")
        self.polls[bid] += 1
        n = self.polls[bid]
        if b["status"] == "QUEUED" and n > self.queued_polls:
            self._start(b)
        elif b["status"] == "RUNNING" and n > self.queued_polls + self.running_polls:
            if self.expire_next > 0:
                self.expire_next -= 1
                self._finish(b, "TIMEOUT_EXCEEDED", partial=True)
            else:
                self._finish(b, "SUCCESS", partial=False)
        elif b["status"] == "CANCELLATION_REQUESTED":
            self._finish(b, "CANCELLED", partial=True)
        return JSONResponse(b)

    async def _cancel(self, request: Request) -> Response:
        b = self.batches.get(request.path_params["bid"])
        if b is None:
            return _error(404, "Batch job not found", "not_found_error")
        if b["status"] in ("QUEUED", "RUNNING"):
            b["status"] = "CANCELLATION_REQUESTED"
        return JSONResponse(b)

    def _start(self, b: dict[str, Any]) -> None:
        lines: list[dict[str, Any]] = []
        bad: dict[str, int] = {}
        not_json, wrong_shape = "a line is not valid JSON", "lines must hold exactly custom_id and body"
        for fid in b["input_files"]:
            for raw in self.contents[fid].splitlines():
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    bad[not_json] = bad.get(not_json, 0) + 1
                    continue
                if not isinstance(rec, dict) or set(rec) != {"custom_id", "body"} or not isinstance(rec["body"], dict):
                    bad[wrong_shape] = bad.get(wrong_shape, 0) + 1
                    continue
                lines.append(rec)
        if bad or not lines:
            b["status"], b["completed_at"] = "FAILED", self._now()
            b["errors"] = [{"message": m, "count": c} for m, c in bad.items()] or [{"message": "empty input"}]
            return
        self.lines[b["id"]] = lines
        b["status"], b["started_at"], b["total_requests"] = "RUNNING", self._now(), len(lines)

    def _finish(self, b: dict[str, Any], status: str, *, partial: bool) -> None:
        out, err = [], []
        for n, rec in enumerate(self._done_rows(b, partial)):
            cid, body = rec["custom_id"], rec["body"]
            text = _text(body)
            rid = f"batch-{b['id'][:8]}-{n}"
            if "FAIL400" in text:
                error = {"object": "error", "message": "Invalid request: FAIL400", "type": "invalid_request_error",
                         "param": None, "code": "1000"}  # fmt: skip
                err.append({"id": rid, "custom_id": cid, "response": {"status_code": 400, "body": error},
                            "error": None})  # fmt: skip
            elif "FAIL429" in text and cid not in self.seen_429:
                self.seen_429.add(cid)
                error = {"object": "error", "message": "Requests rate limit exceeded", "type": "rate_limited",
                         "param": None, "code": "1300"}  # fmt: skip
                err.append({"id": rid, "custom_id": cid, "response": {"status_code": 429, "body": error},
                            "error": None})  # fmt: skip
            elif "FAILSTR" in text:
                err.append({"id": rid, "custom_id": cid, "response": None, "error": "Internal error while processing"})
            else:
                answer = self._answer(b["endpoint"], body, text)
                response = {"status_code": 200, "body": answer}
                out.append({"id": rid, "custom_id": cid, "response": response, "error": None})
        self._rng.shuffle(out)
        self._rng.shuffle(err)
        if out:
            b["output_file"] = self._add_file(f"{b['id']}.jsonl", "batch", jsonl(out), "batch_result")
        if err:
            b["error_file"] = self._add_file(f"{b['id']}_error.jsonl", "batch", jsonl(err), "batch_error")
        b["succeeded_requests"], b["failed_requests"] = len(out), len(err)
        b["completed_requests"] = len(out) + len(err)
        b["status"], b["completed_at"] = status, self._now()

    def _answer(self, endpoint: str, body: dict[str, Any], text: str) -> dict[str, Any]:
        prompt = len(text.split()) + 3
        if endpoint == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "embedding": [0.1, 0.2, float(len(s))], "index": i}
                    for i, s in enumerate(inputs)]  # fmt: skip
            return {"id": uuid.uuid4().hex, "object": "list", "data": data, "model": body.get("model"),
                    "usage": {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0}}  # fmt: skip
        if endpoint == "/v1/moderations":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            results = [{"categories": {"violence_and_threats": "kill" in s, "pii": False},
                        "category_scores": {"violence_and_threats": 0.9 if "kill" in s else 0.01, "pii": 0.0}}
                       for s in inputs]  # fmt: skip
            return {"id": uuid.uuid4().hex, "model": body.get("model"), "results": results}
        content: Any = text
        if "THINK" in text:
            content = [{"type": "thinking", "thinking": [{"type": "text", "text": "let me see"}]},
                       {"type": "text", "text": text}]  # fmt: skip
        completion = len(text.split())
        return {
            "id": uuid.uuid4().hex, "object": "chat.completion", "model": body.get("model"), "created": self._now(),
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "tool_calls": None,
                                                 "prefix": False}, "finish_reason": "stop"}],
        }  # fmt: skip

    async def _direct(self, request: Request) -> Response:
        body = await request.json()
        self.direct_bodies.append(body)
        text = _text(body)
        if "FAIL400" in text:
            return _error(400, "Invalid request: FAIL400")
        return JSONResponse(self._answer(request.url.path, body, text))
