"""A fake of Together AI's Batch API, at the HTTP level, as the `together` SDK (v3) speaks it.

Routes (base URL = the server root; `Authorization: Bearer KEY` on every call):
- files: `POST /v1/files` (multipart `purpose`, `file_name`, `file_type`, `checksum`) answers 302
  with `Location` (a PUT target here) and `X-Together-File-Id`, or 409 `{file_id}` when a file
  with that checksum exists; `PUT /_upload/{id}` takes the bytes; `POST /v1/files/{id}/preprocess`
  finishes the upload; `GET /v1/files` (`{data}`), `GET|DELETE /v1/files/{id}`,
  `GET /v1/files/{id}/content`.
- batches: `POST /v1/batches` answers 201 `{job, warning}`; `GET /v1/batches` a bare array;
  `GET /v1/batches/{id}`; `POST /v1/batches/{id}/cancel`. Errors are `{"error": "string"}`,
  timestamps ISO-8601 strings, statuses upper case (`CANCELING` while cancelling).

A batch moves on when polled: VALIDATING for `validate_polls` polls, then IN_PROGRESS for
`progress_polls`, then COMPLETED (or EXPIRED with the first half of its rows done, for the
next `expire_next` batches). Each row's answer echoes its last user message, with usage, in
shuffled order; a user message holding `FAIL400` gets a 400 line in the error file, `FAIL429`
a 429 line the first time its custom_id is seen and success after. The result line formats
are the fake's reading of Together's docs (OpenAI-like lines; finish reason `eos`; error
lines either a response with `{"error": "string"}` or a bare `error` object).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._openai_like import OpenAILikeFake, jsonl, user_text

__all__ = ["TogetherFake"]

ENDPOINTS = ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/translations")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _text(body: dict[str, Any]) -> str:
    return user_text(body) or ""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@dataclass
class TogetherFake(OpenAILikeFake):
    """The fake's state and controls (OpenAILikeFake's and these); `app` is the ASGI app to serve.

    Expired batches stop EXPIRED; direct calls go to the chat endpoint.
    """

    #: Polls a new batch answers VALIDATING, then IN_PROGRESS, before it ends.
    validate_polls: int = 1
    progress_polls: int = 1
    #: The next N file uploads happen, but their answer is lost (HTTP 500).
    lose_upload_answers: int = 0
    #: The form fields of every upload started.
    upload_forms: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: dict[str, dict[str, Any]] = {}
        routes = Starlette(
            routes=[
                Route("/v1/files", self._upload_start, methods=["POST"]),
                Route("/v1/files", self._list_files, methods=["GET"]),
                Route("/_upload/{fid}", self._upload_put, methods=["PUT"]),
                Route("/v1/files/{fid}/preprocess", self._upload_finish, methods=["POST"]),
                Route("/v1/files/{fid}", self._get_file, methods=["GET"]),
                Route("/v1/files/{fid}", self._delete_file, methods=["DELETE"]),
                Route("/v1/files/{fid}/content", self._content, methods=["GET"]),
                Route("/v1/batches", self._create_batch, methods=["POST"]),
                Route("/v1/batches", self._list_batches, methods=["GET"]),
                Route("/v1/batches/{bid}", self._get_batch, methods=["GET"]),
                Route("/v1/batches/{bid}/cancel", self._cancel, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
            ]
        )

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self.calls.append(f"{scope['method']} {scope['path']}")
                headers = dict(scope.get("headers") or [])
                # The PUT goes to a presigned URL: no API key there.
                presigned = scope["path"].startswith("/_upload/")
                if not presigned and headers.get(b"authorization", b"").decode() != f"Bearer {self.api_key}":
                    await _error(401, "Invalid API key provided")(scope, receive, send)
                    return
            await routes(scope, receive, send)

        self.app = app

    # -- inspection helpers ------------------------------------------------------------------

    def batch_list(self) -> list[dict[str, Any]]:
        return sorted(self.batches.values(), key=lambda b: b["_created"])

    def add_file(self, name: str, data: bytes, purpose: str = "batch-api") -> str:
        """A file uploaded by someone else (say, one that fails validation)."""
        return self._add_file(name, purpose, data)

    # -- files -------------------------------------------------------------------------------

    def _file_obj(self, fid: str) -> dict[str, Any]:
        return {k: v for k, v in self.files[fid].items() if not k.startswith("_")}

    def _add_file(self, name: str, purpose: str, data: bytes, fid: str | None = None) -> str:
        fid = fid or f"file-{uuid.uuid4()}"
        now = datetime.now(UTC).timestamp()
        self.contents[fid] = data
        self.files[fid] = {
            "id": fid, "object": "file", "bytes": len(data), "created_at": int(now), "filename": name,
            "purpose": purpose, "FileType": "jsonl", "processing_status": "COMPLETED", "LineCount": data.count(b"\n"),
            "Processed": True, "_checksum": hashlib.sha256(data).hexdigest(),
        }  # fmt: skip
        return fid

    async def _upload_start(self, request: Request) -> Response:
        form = await request.form()
        purpose, name = form.get("purpose"), form.get("file_name")
        if purpose not in ("fine-tune", "eval", "batch-api", "calibration"):
            return _error(400, f"invalid purpose {purpose!r}")
        if not isinstance(name, str) or not name.endswith(".jsonl"):
            return _error(400, "file_name must name a .jsonl file")
        checksum = form.get("checksum")  # sent by together 3 (and late 2.x), not by 2.0
        self.upload_forms.append({k: v for k, v in form.items() if isinstance(v, str)})
        for fid, f in self.files.items():
            if checksum and f["_checksum"] == checksum and f["purpose"] == purpose:
                return JSONResponse({"message": "file already exists", "file_id": fid}, status_code=409)
        fid = f"file-{uuid.uuid4()}"
        self._pending[fid] = {"name": name, "purpose": purpose, "checksum": checksum, "data": None}
        root = str(request.base_url).rstrip("/")
        return Response(status_code=302, headers={"Location": f"{root}/_upload/{fid}", "X-Together-File-Id": fid})

    async def _upload_put(self, request: Request) -> Response:
        pending = self._pending.get(request.path_params["fid"])
        if pending is None:
            return _error(404, "no such upload")
        pending["data"] = await request.body()
        return Response(status_code=200)

    async def _upload_finish(self, request: Request) -> Response:
        fid = request.path_params["fid"]
        if fid in self.files:  # asked again: the upload is done
            return JSONResponse(self._file_obj(fid))
        pending = self._pending.pop(fid, None)
        if pending is None or pending["data"] is None:
            return _error(404, "no such upload")
        data: bytes = pending["data"]
        if pending["checksum"] and hashlib.sha256(data).hexdigest() != pending["checksum"]:
            return _error(400, "checksum mismatch")
        self._add_file(pending["name"], pending["purpose"], data, fid)
        if self.lose_upload_answers > 0:  # the file stays: only the answer is lost
            self.lose_upload_answers -= 1
            return _error(500, "internal error")
        return JSONResponse(self._file_obj(fid))

    async def _list_files(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._file_obj(f) for f in self.files]})

    async def _get_file(self, request: Request) -> Response:
        fid = request.path_params["fid"]
        return JSONResponse(self._file_obj(fid)) if fid in self.files else _error(404, "file not found")

    async def _delete_file(self, request: Request) -> Response:
        fid = request.path_params["fid"]
        if self.files.pop(fid, None) is None:
            return _error(404, "file not found")
        self.contents.pop(fid, None)
        return JSONResponse({"id": fid, "deleted": True})

    async def _content(self, request: Request) -> Response:
        fid = request.path_params["fid"]
        if fid not in self.contents:
            return _error(404, "file not found")
        return Response(self.contents[fid], media_type="application/octet-stream")

    # -- batches -----------------------------------------------------------------------------

    def _job(self, b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    async def _create_batch(self, request: Request) -> Response:
        req = await request.json()
        if req.get("endpoint") not in ENDPOINTS:
            return _error(400, f"unsupported endpoint {req.get('endpoint')!r}")
        fid = req.get("input_file_id")
        if fid not in self.files:
            return _error(400, f"input file {fid} not found")
        now = datetime.now(UTC).timestamp()
        bid = str(uuid.uuid4())
        self.batches[bid] = {
            "id": bid, "user_id": "user-fake", "input_file_id": fid, "file_size_bytes": self.files[fid]["bytes"],
            "status": "VALIDATING", "job_deadline": _iso(now + 86400), "created_at": _iso(now), "completed_at": None,
            "endpoint": req["endpoint"], "progress": 0.0, "model_id": req.get("model_id"), "output_file_id": None,
            "error_file_id": None, "error": None, "_created": now,
        }  # fmt: skip
        self.polls[bid] = 0
        if self.lose_create_answers > 0:
            self.lose_create_answers -= 1
            return _error(500, "internal error")
        return JSONResponse({"job": self._job(self.batches[bid]), "warning": None}, status_code=201)

    async def _list_batches(self, request: Request) -> Response:
        return JSONResponse([self._job(b) for b in reversed(self.batch_list())])

    async def _get_batch(self, request: Request) -> Response:
        bid = request.path_params["bid"]
        b = self.batches.get(bid)
        if b is None:
            return _error(404, "batch not found")
        self.polls[bid] += 1
        n = self.polls[bid]
        if b["status"] == "VALIDATING" and n > self.validate_polls:
            self._validate(b)
        elif b["status"] == "IN_PROGRESS" and n > self.validate_polls + self.progress_polls:
            if self.expire_next > 0:
                self.expire_next -= 1
                self._finish(b, "EXPIRED", partial=True)
            else:
                self._finish(b, "COMPLETED", partial=False)
        elif b["status"] == "IN_PROGRESS":  # Together reports a percentage done while it runs
            b["progress"] = min(99.0, 100.0 * (n - self.validate_polls) / (self.progress_polls + 1))
        elif b["status"] == "CANCELING":
            self._finish(b, "CANCELLED", partial=True)
        return JSONResponse(self._job(b))

    async def _cancel(self, request: Request) -> Response:
        b = self.batches.get(request.path_params["bid"])
        if b is None:
            return _error(404, "batch not found")
        if b["status"] in ("VALIDATING", "IN_PROGRESS"):
            b["status"] = "CANCELING"
        return JSONResponse(self._job(b))

    async def _chat(self, request: Request) -> Response:
        """The direct (non-batch) chat endpoint: the same answers as a batch row gets."""
        body = await request.json()
        self.direct_bodies.append(body)
        text = _text(body)
        if "FAIL400" in text:
            return _error(400, "Input validation error: FAIL400")
        return JSONResponse(self._completion(body, text))

    def _validate(self, b: dict[str, Any]) -> None:
        lines, seen = [], set()
        for n, raw in enumerate(self.contents[b["input_file_id"]].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                return self._fail(b, f"line {n}: not valid JSON")
            if not isinstance(rec, dict) or set(rec) != {"custom_id", "body"}:
                return self._fail(b, f"line {n}: each line must hold exactly custom_id and body")
            cid = rec["custom_id"]
            if not isinstance(cid, str) or not cid or len(cid) > 64 or cid in seen:
                return self._fail(b, f"line {n}: custom_id must be a unique string of at most 64 characters")
            seen.add(cid)
            if not isinstance(rec["body"], dict) or "messages" not in rec["body"]:
                return self._fail(b, f"line {n}: body must be a chat completion request")
            lines.append(rec)
        self.lines[b["id"]] = lines
        b["status"] = "IN_PROGRESS"

    def _fail(self, b: dict[str, Any], message: str) -> None:
        b["status"], b["error"] = "FAILED", message
        b["completed_at"] = _iso(datetime.now(UTC).timestamp())

    def _finish(self, b: dict[str, Any], status: str, *, partial: bool) -> None:
        out, err = [], []
        for n, rec in enumerate(self._done_rows(b, partial)):
            cid, body = rec["custom_id"], rec["body"]
            text = _text(body)
            # The shapes of Together's docs: a result line is `{custom_id, response: {status_code,
            # body}}`; an error-file line `{custom_id, error: {message, code}}`, the code a name.
            if "FAIL400" in text:
                err.append({"custom_id": cid, "error": {"message": "Input validation error: FAIL400",
                            "code": "invalid_model"}})  # fmt: skip
            elif "FAIL429" in text and cid not in self.seen_429:
                self.seen_429.add(cid)
                err.append({"custom_id": cid, "error": {"message": "Request timed out, retry later",
                            "code": "timeout"}})  # fmt: skip
            elif "FAILSTATUS" in text:  # the OpenAI-like shape, in case Together also writes it
                rid = f"req-{b['id'][:8]}-{n}"
                message = "Input validation error: FAILSTATUS"
                response = {"status_code": 400, "request_id": rid, "body": {"error": message}}
                err.append({"id": rid, "custom_id": cid, "response": response, "error": None})
            else:
                out.append({"custom_id": cid, "response": {"status_code": 200, "body": self._completion(body, text)}})
        self._rng.shuffle(out)
        self._rng.shuffle(err)
        if out:
            b["output_file_id"] = self._add_file(f"{b['id']}-output.jsonl", "batch-api", jsonl(out))
        if err:
            b["error_file_id"] = self._add_file(f"{b['id']}-errors.jsonl", "batch-api", jsonl(err))
        b["status"], b["progress"] = status, 100.0 if not partial else 50.0
        b["completed_at"] = _iso(datetime.now(UTC).timestamp())

    def _completion(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or []) + 3
        completion = len(text.split())
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
            "created": int(datetime.now(UTC).timestamp()), "model": body.get("model"), "prompt": [],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                         "finish_reason": "eos", "logprobs": None, "seed": 42}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }  # fmt: skip
