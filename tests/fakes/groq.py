"""A fake of Groq's Batch API, and the OpenAI-style batch core that the Azure fake builds on.

Groq speaks OpenAI's wire format (shared/reference/provider-batch-apis.md, sections 1 and 7):
files and batches under `/openai/v1`, `Authorization: Bearer KEY`, windows from `24h` to
`7d`. Where it differs, the fake does too: `GET /batches` and `GET /files` answer
`{object: "list", data}` with every item and no `has_more`, ignoring `after` and `limit`
(the worst case the reference allows), and batch objects carry no `model` or `usage`.

`FakeBatchAPI` holds the state (files, batches, every call received) and the controls tests
steer it with; each flavour (`FakeGroq`, `tests/fakes/azure.py`'s `FakeAzure`) sets the wire
details. Batches move one status per `steps_per_poll` retrievals: validating, in_progress,
finalizing, completed. Results come out shuffled. A marker in a request's last user message
picks its fate: `FAIL400` answers 400 (error file, final), `FAIL429` answers 429 the first
time its custom_id is seen and succeeds after. Controls: `reject_creates` (creates refused
with `token_limit_exceeded`), `lose_create_responses` (the batch is made, the answer is a
500), `expire_next` / `expire(batch_id)` (a batch expires having run only some requests; the
rest get `batch_expired` lines).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FAIL400", "FAIL429", "FakeBatch", "FakeBatchAPI", "FakeFile", "FakeGroq", "error_response"]

FAIL400 = "FAIL400"
FAIL429 = "FAIL429"


@dataclass
class FakeFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    expires_after: dict[str, Any] | None = None


@dataclass
class FakeBatch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    status: str = "validating"
    polls: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] | None = None
    #: Set by the expire control: how many requests (in input order) run before it expires.
    expire_keep: int | None = None
    times: dict[str, int] = field(default_factory=dict)
    output_expires_after: dict[str, Any] | None = None
    #: The input file's bytes when the batch was created: a batch runs on even if its input
    #: file is deleted afterwards (llmbatch deletes each chunk's upload once it is collected).
    input_data: bytes = b""


def error_response(
    status: int, message: str, code: str | None = None, type_: str = "invalid_request_error"
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class FakeBatchAPI:
    """Files and batches with OpenAI's semantics; subclasses set the flavour's wire details."""

    #: Where the API's routes live.
    prefix = "/openai/v1"
    #: Whether list endpoints page (`after`, `limit`, `has_more`) or answer everything at once.
    paginates = True
    #: Endpoints a batch may name (`window_ok` says which windows it may ask for).
    batch_endpoints: frozenset[str] = frozenset({"/v1/chat/completions"})

    def __init__(
        self,
        *,
        key: str = "test",
        steps_per_poll: int = 1,
        keep_metadata: bool = True,
        list_order: str = "desc",
        seed: int = 0,
    ) -> None:
        self.key = key
        self.steps_per_poll = steps_per_poll
        self.keep_metadata = keep_metadata
        self.list_order = list_order
        self.rng = random.Random(seed)
        self.files: dict[str, FakeFile] = {}
        self.batches: dict[str, FakeBatch] = {}
        #: Every request received: method, path, query and the auth headers.
        self.calls: list[dict[str, Any]] = []
        #: Controls: how many of the next creates to refuse or to answer with a 500 after creating.
        self.reject_creates = 0
        self.lose_create_responses = 0
        #: How many of the next batches to expire when they would finish, and how much of each runs.
        self.expire_next = 0
        self.expire_fraction = 0.5
        self.seen_429: set[str] = set()
        self.lock = threading.Lock()

    # -- flavour hooks -----------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.key}"

    def new_id(self, kind: str) -> str:
        return f"{kind}_{uuid.uuid4().hex[:24]}"

    def batch_object(self, b: FakeBatch) -> dict[str, Any]:
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": {"object": "list", "data": b.errors} if b.errors else None,
            "input_file_id": b.input_file_id,
            "completion_window": b.completion_window,
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": b.created_at,
            "in_progress_at": b.times.get("in_progress"),
            "expires_at": b.created_at + 86400,
            "finalizing_at": b.times.get("finalizing"),
            "completed_at": b.times.get("completed"),
            "failed_at": b.times.get("failed"),
            "expired_at": b.times.get("expired"),
            "cancelling_at": b.times.get("cancelling"),
            "cancelled_at": b.times.get("cancelled"),
            "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
            "metadata": b.metadata,
        }

    def file_object(self, f: FakeFile) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": f.id,
            "object": "file",
            "bytes": len(f.data),
            "created_at": f.created_at,
            "filename": f.filename,
            "purpose": f.purpose,
            "status": "processed",
        }
        if f.expires_after:
            obj["expires_at"] = f.created_at + int(f.expires_after.get("seconds") or 0)
        return obj

    def output_line(self, custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.new_id("batch_req"),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": self.new_id("req"), "body": body},
            "error": None,
        }

    def not_run_line(self, custom_id: str, code: str, message: str) -> dict[str, Any]:
        return {
            "id": self.new_id("batch_req"),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }

    def decorate_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Adds the flavour's own fields to a chat completion."""
        return body

    def check_model(self, model: Any) -> tuple[int, dict[str, Any]] | None:
        """A refusal for a model the flavour does not serve (None: served)."""
        return None

    def no_file(self) -> str | None:
        return None

    def list_body(self, items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
        if not self.paginates:
            return {"object": "list", "data": items}
        after = request.query_params.get("after")
        limit = int(request.query_params.get("limit") or 20)
        if after:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }

    # -- requests: what one request is answered ------------------------------------------------

    def answer(self, endpoint: str, body: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for one request; `key` tells FAIL429's first sight from later ones."""
        refused = self.check_model(body.get("model"))
        if refused:
            return refused
        if endpoint.endswith("/embeddings"):
            text = body.get("input") if isinstance(body.get("input"), str) else json.dumps(body.get("input"))
        elif endpoint.endswith("/responses"):
            inp = body.get("input")
            text = inp if isinstance(inp, str) else _text_of((inp or [{}])[-1].get("content"))
        else:
            users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
            text = _text_of(users[-1].get("content")) if users else ""
        if FAIL400 in text:
            return 400, {
                "error": {
                    "message": "the request asked to fail (FAIL400)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_value",
                }
            }
        if FAIL429 in text and (key or text) not in self.seen_429:
            self.seen_429.add(key or text)
            return 429, {
                "error": {
                    "message": "rate limited (FAIL429), try again",
                    "type": "rate_limit_error",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
        model = body.get("model") or "unknown"
        prompt = len(json.dumps(body.get("messages") or body.get("input") or "").split())
        out = max(len(text.split()), 1)
        now = int(time.time())
        if endpoint.endswith("/embeddings"):
            return 200, {
                "object": "list",
                "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        if endpoint.endswith("/responses"):
            return 200, {
                "id": self.new_id("resp"),
                "object": "response",
                "created_at": now,
                "status": "completed",
                "model": model,
                "output": [
                    {
                        "type": "message",
                        "id": self.new_id("msg"),
                        "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}],
                    }
                ],
                "usage": {
                    "input_tokens": prompt,
                    "output_tokens": out,
                    "total_tokens": prompt + out,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens_details": {"reasoning_tokens": 0},
                },
            }
        return 200, self.decorate_chat(
            {
                "id": self.new_id("chatcmpl"),
                "object": "chat.completion",
                "created": now,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out},
            }
        )

    # -- the batch lifecycle -------------------------------------------------------------------

    def _lines(self, b: FakeBatch) -> list[Any]:
        out: list[Any] = []
        for raw in b.input_data.splitlines():
            if raw.strip():
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    out.append(None)
        return out

    def validation_errors(self, b: FakeBatch) -> list[dict[str, Any]]:
        """Why the batch fails validation (empty: it runs)."""
        errors = []
        models = set()
        for n, rec in enumerate(self._lines(b), start=1):
            if not isinstance(rec, dict):
                errors.append({"code": "invalid_json_line", "message": "not JSON", "param": None, "line": n})
            elif rec.get("url") != b.endpoint:
                errors.append(
                    {
                        "code": "invalid_url",
                        "param": "url",
                        "line": n,
                        "message": f"url {rec.get('url')!r} is not {b.endpoint!r}",
                    }
                )
            else:
                models.add((rec.get("body") or {}).get("model"))
        if len(models) > 1:
            errors.append(
                {
                    "code": "mixed_models",
                    "param": "body.model",
                    "line": None,
                    "message": "every line of a batch must use the same model",
                }
            )
        return errors

    def _store_file(self, name: str, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return self.no_file()
        self.rng.shuffle(lines)
        f = FakeFile(
            self.new_id("file"),
            name,
            "batch_output",
            "".join(json.dumps(x) + "\n" for x in lines).encode(),
            int(time.time()),
        )
        self.files[f.id] = f
        return f.id

    def _finish(self, b: FakeBatch, status: str, ran: int | None = None) -> None:
        """Runs the batch's requests (the first `ran` of them; None: all) and writes its result files."""
        lines = self._lines(b)
        ok: list[dict[str, Any]] = []
        bad: list[dict[str, Any]] = []
        for n, rec in enumerate(lines):
            cid = rec["custom_id"]
            if ran is not None and n >= ran:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                message = (
                    "This request could not be executed before the completion window expired."
                    if status == "expired"
                    else "This request was not executed because the batch was cancelled."
                )
                bad.append(self.not_run_line(cid, code, message))
                continue
            http, body = self.answer(b.endpoint, rec.get("body") or {}, cid)
            (ok if http == 200 else bad).append(self.output_line(cid, http, body))
        b.completed, b.failed = len(ok), len(bad)
        b.output_file_id = self._store_file(f"{b.id}_output.jsonl", ok)
        b.error_file_id = self._store_file(f"{b.id}_error.jsonl", bad)
        b.status = status
        b.times[status] = int(time.time())

    def step(self, b: FakeBatch) -> None:
        """One status forward (called on retrieval)."""
        b.polls += 1
        if b.polls < self.steps_per_poll or b.status in ("completed", "failed", "expired", "cancelled"):
            return
        b.polls = 0
        if b.status == "validating":
            errors = self.validation_errors(b)
            if errors:
                b.errors, b.status = errors, "failed"
                b.times["failed"] = int(time.time())
            else:
                b.total, b.status = len(self._lines(b)), "in_progress"
                b.times["in_progress"] = int(time.time())
        elif b.status == "in_progress":
            if b.expire_keep is None and self.expire_next > 0:
                self.expire_next -= 1
                b.expire_keep = int(b.total * self.expire_fraction)
            if b.expire_keep is not None:
                self._finish(b, "expired", ran=b.expire_keep)
            else:
                b.status = "finalizing"
                b.times["finalizing"] = int(time.time())
        elif b.status == "finalizing":
            self._finish(b, "completed")
        elif b.status == "cancelling":
            self._finish(b, "cancelled", ran=0)

    def expire(self, batch_id: str, keep: int) -> None:
        """Expires a running batch at its next step, with only its first `keep` requests run."""
        with self.lock:
            self.batches[batch_id].expire_keep = keep

    def tags(self) -> list[str | None]:
        """The chunk tag of every batch, in creation order (None where the metadata was dropped)."""
        with self.lock:
            return [b.metadata.get("llmbatch_chunk") if b.metadata else None for b in self.batches.values()]

    def sent_custom_ids(self) -> list[str]:
        """The custom_id of every line of every batch's input: what was sent, repeats included."""
        with self.lock:
            return [rec["custom_id"] for b in self.batches.values() for rec in self._lines(b)]

    # -- HTTP --------------------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        self.calls.append(
            {
                "method": request.method,
                "path": request.url.path,
                "query": dict(request.query_params),
                "api-key": request.headers.get("api-key"),
                "authorization": request.headers.get("authorization"),
            }
        )

    def _listing(self, objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # By creation time (then creation order), newest first unless the fake is told otherwise.
        ranked = sorted(enumerate(objs), key=lambda t: (t[1]["created_at"], t[0]), reverse=self.list_order != "asc")
        return [obj for _, obj in ranked]

    async def upload_file(self, request: Request, api: str) -> Response:
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return error_response(400, "file is required", "missing_required_parameter")
        data = await upload.read()
        seconds = form.get("expires_after[seconds]")
        expires = {"anchor": form.get("expires_after[anchor]"), "seconds": int(str(seconds))} if seconds else None
        with self.lock:
            f = FakeFile(
                self.new_id("file"),
                upload.filename or "upload.jsonl",
                str(form.get("purpose") or ""),
                data,
                int(time.time()),
                expires,
            )
            self.files[f.id] = f
            return JSONResponse(self.file_object(f))

    async def list_files(self, request: Request, api: str) -> Response:
        purpose = request.query_params.get("purpose")
        with self.lock:
            objs = [self.file_object(f) for f in self.files.values() if not purpose or f.purpose == purpose]
            return JSONResponse(self.list_body(self._listing(objs), request))

    async def file(self, request: Request, api: str) -> Response:
        file_id = request.path_params["file_id"]
        with self.lock:
            f = self.files.get(file_id)
            if f is None:
                return error_response(404, f"no such file: {file_id}", "not_found")
            if request.method == "DELETE":
                del self.files[file_id]
                return JSONResponse({"id": file_id, "object": "file", "deleted": True})
            return JSONResponse(self.file_object(f))

    async def file_content(self, request: Request, api: str) -> Response:
        with self.lock:
            f = self.files.get(request.path_params["file_id"])
            if f is None:
                return error_response(404, "no such file", "not_found")
            return Response(f.data, media_type="application/octet-stream")

    async def create_batch(self, request: Request, api: str) -> Response:
        params = await request.json()
        with self.lock:
            if params.get("input_file_id") not in self.files:
                return error_response(404, f"no such file: {params.get('input_file_id')}", "not_found")
            if params.get("endpoint") not in self.endpoints_for(api):
                return error_response(400, f"endpoint {params.get('endpoint')!r} is not supported", "invalid_value")
            if not self.window_ok(params.get("completion_window")):
                return error_response(
                    400, f"completion_window {params.get('completion_window')!r} is not supported", "invalid_value"
                )
            if self.reject_creates > 0:
                self.reject_creates -= 1
                return error_response(
                    400,
                    "The number of enqueued tokens has surpassed the configured limit for the "
                    "deployment. Please try again once the current jobs have finished.",
                    "token_limit_exceeded",
                )
            b = FakeBatch(
                self.new_id("batch"),
                params["input_file_id"],
                params["endpoint"],
                params["completion_window"],
                params.get("metadata") if self.keep_metadata else None,
                int(time.time()),
                output_expires_after=params.get("output_expires_after"),
                input_data=self.files[params["input_file_id"]].data,
            )
            self.batches[b.id] = b
            if self.lose_create_responses > 0:
                self.lose_create_responses -= 1
                return error_response(500, "the server had an error while processing the request", None, "server_error")
            return JSONResponse(self.batch_object(b))

    def endpoints_for(self, api: str) -> frozenset[str]:
        return self.batch_endpoints

    def window_ok(self, window: Any) -> bool:
        return window == "24h"

    async def list_batches(self, request: Request, api: str) -> Response:
        with self.lock:
            objs = [self.batch_object(b) for b in self.batches.values()]
            return JSONResponse(self.list_body(self._listing(objs), request))

    async def batch(self, request: Request, api: str) -> Response:
        with self.lock:
            b = self.batches.get(request.path_params["batch_id"])
            if b is None:
                return error_response(404, "no such batch", "not_found")
            self.step(b)
            return JSONResponse(self.batch_object(b))

    async def cancel_batch(self, request: Request, api: str) -> Response:
        with self.lock:
            b = self.batches.get(request.path_params["batch_id"])
            if b is None:
                return error_response(404, "no such batch", "not_found")
            if b.status in ("validating", "in_progress", "finalizing"):
                b.status, b.polls = "cancelling", 0
                b.times["cancelling"] = int(time.time())
            return JSONResponse(self.batch_object(b))

    async def chat(self, request: Request, api: str) -> Response:
        body = await request.json()
        with self.lock:
            status, answer = self.answer("/v1/chat/completions", body, None)
        return JSONResponse(answer, status)

    def routes(self, prefix: str, api: str, chat_path: str | None = None) -> list[Route]:
        """The API's routes under `prefix` (and its direct chat API at `chat_path`), each checking
        auth first and recording the call."""

        def guarded(handler: Any) -> Any:
            async def endpoint(request: Request) -> Response:
                with self.lock:
                    self._record(request)
                refusal = self.refuse(request, api)
                return refusal if refusal is not None else await handler(request, api)

            return endpoint

        return [
            Route(f"{prefix}/files", guarded(self.upload_file), methods=["POST"]),
            Route(f"{prefix}/files", guarded(self.list_files), methods=["GET"]),
            Route(f"{prefix}/files/{{file_id}}", guarded(self.file), methods=["GET", "DELETE"]),
            Route(f"{prefix}/files/{{file_id}}/content", guarded(self.file_content), methods=["GET"]),
            Route(f"{prefix}/batches", guarded(self.create_batch), methods=["POST"]),
            Route(f"{prefix}/batches", guarded(self.list_batches), methods=["GET"]),
            Route(f"{prefix}/batches/{{batch_id}}", guarded(self.batch), methods=["GET"]),
            Route(f"{prefix}/batches/{{batch_id}}/cancel", guarded(self.cancel_batch), methods=["POST"]),
            Route(chat_path or f"{prefix}/chat/completions", guarded(self.chat), methods=["POST"]),
        ]

    def refuse(self, request: Request, api: str) -> Response | None:
        if not self.authorized(request):
            return error_response(401, "invalid API key", "invalid_api_key", "authentication_error")
        return None

    @property
    def app(self) -> Starlette:
        return Starlette(routes=self.routes(self.prefix, "v1"))


class FakeGroq(FakeBatchAPI):
    """Groq: OpenAI's format under `/openai/v1`, windows 24h to 7d, lists that do not page."""

    paginates = False

    def window_ok(self, window: Any) -> bool:
        # Groq takes "24h" to "7d", in hours or days.
        m = re.fullmatch(r"(\d+)([hd])", window or "")
        hours = int(m.group(1)) * (24 if m.group(2) == "d" else 1) if m else 0
        return 24 <= hours <= 7 * 24

    def decorate_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        body["system_fingerprint"] = "fp_fake"
        body["usage"].update({"queue_time": 0.01, "prompt_time": 0.001, "completion_time": 0.002, "total_time": 0.003})
        body["x_groq"] = {"id": self.new_id("req")}
        return body
