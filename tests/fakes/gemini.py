"""A fake of the Gemini API's batch mode, Files API and generateContent, over real HTTP.

Built from shared/reference/provider-batch-apis.md (section 4) and what the `google-genai`
SDK sends: long-running-operation shaped batches (`BATCH_STATE_*` in `metadata.state`),
inline requests with `metadata.key` or a JSONL file of `{"key", "request"}` lines, results
inline or as a generated responses file, the resumable upload protocol
(`X-Goog-Upload-*` headers), `x-goog-api-key` auth. Bodies are read in camelCase or
snake_case, as the API does (the SDK sends a mix).

A request's last user text steers its answer: `FAIL400` fails it with code 400, `FAIL429`
fails it with 429 the first time its key is seen, `BLOCK` ends it with finishReason SAFETY,
`TOOL` (with tools declared) calls the first function; anything else is echoed back, with
usage that includes cached and thought tokens.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["GeminiFake", "FakeBatch", "FakeFile"]

TERMINAL = {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"}


def _get(d: Any, camel: str, default: Any = None) -> Any:
    """A field by its camelCase or snake_case name."""
    if not isinstance(d, dict):
        return default
    if camel in d:
        return d[camel]
    snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)
    return d.get(snake, default)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _error(code: int, status: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "status": status}}, status_code=code)


def last_user_text(request: dict[str, Any]) -> str:
    """The text of the last user turn of a GenerateContentRequest (camel or snake case)."""
    for content in reversed(_get(request, "contents") or []):
        if content.get("role", "user") == "user":
            return "".join(p.get("text", "") for p in content.get("parts") or [] if isinstance(p, dict))
    return ""


@dataclass
class FakeFile:
    name: str
    display_name: str
    mime_type: str
    data: bytes
    created: float
    source: str = "UPLOADED"

    def json(self, root: str) -> dict[str, Any]:
        out = {
            "name": self.name,
            "displayName": self.display_name,
            "mimeType": self.mime_type,
            "sizeBytes": str(len(self.data)),
            "createTime": _iso(self.created),
            "updateTime": _iso(self.created),
            "expirationTime": _iso(self.created + 48 * 3600),
            "sha256Hash": base64.b64encode(hashlib.sha256(self.data).digest()).decode(),
            "uri": f"{root}/v1beta/{self.name}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.source == "GENERATED":
            out["downloadUri"] = f"{root}/download/v1beta/{self.name}:download?alt=media"
        return out


@dataclass
class FakeBatch:
    id: str
    model: str
    display_name: str
    kind: str  # "generate" or "embed"
    source: str  # "inline" or "file"
    requests: list[tuple[str | None, dict[str, Any]]]
    created: float
    input_file: str | None = None
    state: str = "BATCH_STATE_PENDING"
    polls: int = 0
    updated: float = 0.0
    ended: float | None = None
    output: dict[str, Any] | None = None
    expire: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
    #: Requests answered so far while RUNNING (one more each poll), as `batchStats` reports them.
    running_done: int = 0

    @property
    def name(self) -> str:
        return f"batches/{self.id}"

    def operation(self) -> dict[str, Any]:
        kind = "GenerateContentBatch" if self.kind == "generate" else "EmbedContentBatch"
        failed = sum(1 for r in self.results if "error" in r)
        done = len(self.results) or self.running_done
        meta: dict[str, Any] = {
            "@type": f"type.googleapis.com/google.ai.generativelanguage.v1beta.{kind}",
            "model": self.model,
            "displayName": self.display_name,
            "createTime": _iso(self.created),
            "updateTime": _iso(self.updated or self.created),
            "batchStats": {
                "requestCount": str(len(self.requests)),
                "successfulRequestCount": str(done - failed),
                "failedRequestCount": str(failed),
                "pendingRequestCount": str(len(self.requests) - done),
            },
            "state": self.state,
            "name": self.name,
        }
        op: dict[str, Any] = {"name": self.name, "metadata": meta, "done": self.state in TERMINAL}
        if self.ended is not None:
            meta["endTime"] = _iso(self.ended)
        if self.output is not None:
            meta["output"] = self.output
            out_type = "GenerateContentBatchOutput" if self.kind == "generate" else "EmbedContentBatchOutput"
            op["response"] = {"@type": f"type.googleapis.com/google.ai.generativelanguage.v1beta.{out_type}"}
            op["response"].update(self.output)
        return op


class GeminiFake:
    """The fake API (`.app`) and its state, which tests read and steer."""

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        pending_polls: int = 1,
        running_polls: int = 1,
        reverse_results: bool = False,
        drop_inline_keys: bool = False,
        max_page_size: int = 100,
        create_delay: float = 0.0,
    ) -> None:
        self.api_key = api_key
        #: Polls (GETs of a batch) it stays PENDING, then RUNNING, before it ends.
        self.pending_polls = pending_polls
        self.running_polls = running_polls
        #: Return results in reverse input order (adapters must match by key).
        self.reverse_results = reverse_results
        #: Leave `metadata.key` out of inline results, as some reports say the API does.
        self.drop_inline_keys = drop_inline_keys
        #: The next this many inline batches answer one request fewer (the last result left out).
        self.short_inline = 0
        #: Embed results inline even for a batch whose requests came in a file (reported to happen).
        self.inline_embed_results = False
        self.max_page_size = max_page_size
        #: Seconds between making a batch and answering the create call (a window for crashes).
        self.create_delay = create_delay
        self.lock = threading.Lock()
        self.batches: dict[str, FakeBatch] = {}
        self.files: dict[str, FakeFile] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.failed_once: set[str] = set()
        self.to_expire = 0
        self.direct_requests: list[dict[str, Any]] = []
        #: The model each direct call named in its path (`models/M:generateContent`), in order.
        self.direct_models: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.app = Starlette(routes=[Route("/{path:path}", self._dispatch, methods=["GET", "POST", "DELETE"])])

    # -- controls and inspection -----------------------------------------------------------

    def expire_next(self, n: int = 1) -> None:
        """The next `n` batches created end EXPIRED, with no results (as Gemini's do after 48h)."""
        with self.lock:
            self.to_expire += n

    def all_batches(self) -> list[FakeBatch]:
        with self.lock:
            return sorted(self.batches.values(), key=lambda b: b.created)

    def sent_keys(self) -> list[str | None]:
        """The key of every request of every batch, in creation order."""
        return [key for b in self.all_batches() for key, _ in b.requests]

    # -- routing ---------------------------------------------------------------------------

    _ROUTES: list[tuple[str, re.Pattern[str], str]] = [
        ("POST", re.compile(r"^/upload/[^/]+/files$"), "_upload"),
        ("POST", re.compile(r"^/[^/]+/models/(?P<model>[^/:]+):batchGenerateContent$"), "_create_generate"),
        ("POST", re.compile(r"^/[^/]+/models/(?P<model>[^/:]+):asyncBatchEmbedContent$"), "_create_embed"),
        ("POST", re.compile(r"^/[^/]+/models/(?P<model>[^/:]+):generateContent$"), "_generate"),
        ("POST", re.compile(r"^/[^/]+/models/(?P<model>[^/:]+):batchEmbedContents$"), "_embed"),
        ("GET", re.compile(r"^/[^/]+/batches$"), "_list_batches"),
        ("GET", re.compile(r"^/[^/]+/batches/(?P<id>[^/:]+)$"), "_get_batch"),
        ("POST", re.compile(r"^/[^/]+/batches/(?P<id>[^/:]+):cancel$"), "_cancel_batch"),
        ("DELETE", re.compile(r"^/[^/]+/batches/(?P<id>[^/:]+)$"), "_delete_batch"),
        ("GET", re.compile(r"^/[^/]+/files$"), "_list_files"),
        ("GET", re.compile(r"^/(?:download/)?[^/]+/files/(?P<id>[^/:]+):download$"), "_download"),
        ("GET", re.compile(r"^/[^/]+/files/(?P<id>[^/:]+)$"), "_get_file"),
        ("DELETE", re.compile(r"^/[^/]+/files/(?P<id>[^/:]+)$"), "_delete_file"),
    ]

    async def _dispatch(self, request: Request) -> Response:
        path = request.scope["path"]
        with self.lock:
            self.calls.append((request.method, path))
        is_upload_chunk = path.startswith("/upload/") and "upload_id" in request.query_params
        if not is_upload_chunk:
            key = request.headers.get("x-goog-api-key")
            if not key:
                return _error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers")
            if key != self.api_key:
                return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        for method, pattern, handler in self._ROUTES:
            m = pattern.match(path)
            if m and method == request.method:
                return await getattr(self, handler)(request, **m.groupdict())
        return _error(404, "NOT_FOUND", f"no route for {request.method} {path}")

    def _root(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    # -- files -----------------------------------------------------------------------------

    async def _upload(self, request: Request) -> Response:
        upload_id = request.query_params.get("upload_id")
        if upload_id is None:
            if request.headers.get("x-goog-upload-protocol") != "resumable":
                return _error(400, "INVALID_ARGUMENT", "only resumable uploads are faked")
            meta = _get(await request.json(), "file") or {}
            upload_id = secrets.token_hex(8)
            with self.lock:
                self.uploads[upload_id] = {
                    "display_name": _get(meta, "displayName") or "",
                    "mime_type": request.headers.get("x-goog-upload-header-content-type") or _get(meta, "mimeType"),
                    "size": int(request.headers.get("x-goog-upload-header-content-length") or 0),
                    "data": bytearray(),
                }
            url = f"{self._root(request)}{request.url.path}?upload_id={upload_id}"
            return JSONResponse({}, headers={"x-goog-upload-url": url, "x-goog-upload-status": "active"})
        with self.lock:
            session = self.uploads.get(upload_id)
        if session is None:
            return _error(404, "NOT_FOUND", "no such upload session")
        command = request.headers.get("x-goog-upload-command", "")
        offset = int(request.headers.get("x-goog-upload-offset", "0"))
        chunk = await request.body()
        with self.lock:
            if offset != len(session["data"]):
                return _error(400, "INVALID_ARGUMENT", f"offset {offset} != {len(session['data'])}")
            session["data"] += chunk
            if "finalize" not in command:
                return JSONResponse({}, headers={"x-goog-upload-status": "active"})
            name = f"files/{secrets.token_hex(6)}"
            f = FakeFile(name, session["display_name"], session["mime_type"] or "", bytes(session["data"]), time.time())
            self.files[name] = f
            del self.uploads[upload_id]
        return JSONResponse({"file": f.json(self._root(request))}, headers={"x-goog-upload-status": "final"})

    async def _list_files(self, request: Request) -> Response:
        with self.lock:
            files = sorted(self.files.values(), key=lambda f: f.created, reverse=True)
        page, token = self._page(request, files)
        body: dict[str, Any] = {"files": [f.json(self._root(request)) for f in page]}
        if token:
            body["nextPageToken"] = token
        return JSONResponse(body)

    async def _get_file(self, request: Request, id: str) -> Response:
        f = self.files.get(f"files/{id}")
        return JSONResponse(f.json(self._root(request))) if f else _error(404, "NOT_FOUND", "no such file")

    async def _delete_file(self, request: Request, id: str) -> Response:
        with self.lock:
            gone = self.files.pop(f"files/{id}", None)
        return JSONResponse({}) if gone else _error(404, "NOT_FOUND", "no such file")

    async def _download(self, request: Request, id: str) -> Response:
        f = self.files.get(f"files/{id}")
        if f is None:
            return _error(404, "NOT_FOUND", "no such file")
        if f.source != "GENERATED":
            return _error(400, "INVALID_ARGUMENT", "only generated files can be downloaded")
        return Response(f.data, media_type="application/octet-stream")

    def _page(self, request: Request, items: list[Any]) -> tuple[list[Any], str | None]:
        size = min(int(request.query_params.get("pageSize") or 10), self.max_page_size)
        start = int(request.query_params.get("pageToken") or 0)
        end = start + size
        return items[start:end], (str(end) if end < len(items) else None)

    # -- batches ---------------------------------------------------------------------------

    async def _create_generate(self, request: Request, model: str) -> Response:
        return await self._create(request, model, "generate")

    async def _create_embed(self, request: Request, model: str) -> Response:
        return await self._create(request, model, "embed")

    async def _create(self, request: Request, model: str, kind: str) -> Response:
        batch = _get(await request.json(), "batch") or {}
        config = _get(batch, "inputConfig") or {}
        file_name = _get(config, "fileName")
        requests: list[tuple[str | None, dict[str, Any]]] = []
        if file_name:
            f = self.files.get(file_name)
            if f is None:
                return _error(404, "NOT_FOUND", f"no such file {file_name}")
            for line in f.data.splitlines():
                if line.strip():
                    rec = orjson.loads(line)
                    requests.append((rec.get("key"), rec["request"]))
            source = "file"
        else:
            for item in (_get(config, "requests") or {}).get("requests") or []:
                requests.append(((item.get("metadata") or {}).get("key"), item["request"]))
            source = "inline"
        if not requests:
            return _error(400, "INVALID_ARGUMENT", "a batch needs at least one request")
        now = time.time()
        with self.lock:
            expire = self.to_expire > 0
            self.to_expire -= int(expire)
            b = FakeBatch(
                id=secrets.token_hex(6),
                model=f"models/{model}",
                display_name=_get(batch, "displayName") or "",
                kind=kind,
                source=source,
                requests=requests,
                created=now,
                input_file=file_name,
                expire=expire,
            )
            self.batches[b.id] = b
            answer = b.operation()
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        return JSONResponse(answer)

    async def _get_batch(self, request: Request, id: str) -> Response:
        with self.lock:
            b = self.batches.get(id)
            if b is None:
                return _error(404, "NOT_FOUND", f"no such batch batches/{id}")
            b.polls += 1
            if b.state == "BATCH_STATE_PENDING" and b.polls > self.pending_polls:
                b.state = "BATCH_STATE_RUNNING"
            if b.state == "BATCH_STATE_RUNNING" and b.polls > self.pending_polls + self.running_polls:
                self._finish(b)
            elif b.state == "BATCH_STATE_RUNNING":
                b.running_done = min(len(b.requests) - 1, b.polls - self.pending_polls)
            return JSONResponse(b.operation())

    async def _list_batches(self, request: Request) -> Response:
        with self.lock:
            batches = sorted(self.batches.values(), key=lambda b: b.created, reverse=True)
            page, token = self._page(request, batches)
            body: dict[str, Any] = {"operations": [b.operation() for b in page]}
        if token:
            body["nextPageToken"] = token
        return JSONResponse(body)

    async def _cancel_batch(self, request: Request, id: str) -> Response:
        with self.lock:
            b = self.batches.get(id)
            if b is None:
                return _error(404, "NOT_FOUND", "no such batch")
            if b.state not in TERMINAL:
                b.state = "BATCH_STATE_CANCELLED"
                b.ended = b.updated = time.time()
        return JSONResponse({})

    async def _delete_batch(self, request: Request, id: str) -> Response:
        with self.lock:
            gone = self.batches.pop(id, None)
        return JSONResponse({}) if gone else _error(404, "NOT_FOUND", "no such batch")

    def _finish(self, b: FakeBatch) -> None:
        b.ended = b.updated = time.time()
        if b.expire:
            b.state = "BATCH_STATE_EXPIRED"
            return
        answer = self._answer if b.kind == "generate" else self._embedding
        b.results = [{**answer(key, req, b.model), "_key": key} for key, req in b.requests]
        ordered = list(reversed(b.results)) if self.reverse_results else b.results
        b.state = "BATCH_STATE_SUCCEEDED"
        if b.source == "inline" and self.short_inline:
            self.short_inline -= 1
            b.results.pop()  # what came back is what was generated: tests count usage from b.results
            ordered = list(reversed(b.results)) if self.reverse_results else b.results
        if b.source == "inline" or (b.kind == "embed" and self.inline_embed_results):
            items = []
            for r in ordered:
                item = {k: v for k, v in r.items() if k != "_key"}
                if not self.drop_inline_keys:
                    item["metadata"] = {"key": r["_key"]}
                items.append(item)
            field = "inlinedResponses" if b.kind == "generate" else "inlinedEmbedContentResponses"
            b.output = {field: {"inlinedResponses": items}}
        else:
            lines = b"".join(
                orjson.dumps({"key": r["_key"], **{k: v for k, v in r.items() if k != "_key"}}) + b"\n" for r in ordered
            )
            name = f"files/batch-{b.id}"
            self.files[name] = FakeFile(name, f"results of {b.name}", "application/jsonl", lines, b.ended, "GENERATED")
            b.output = {"responsesFile": name}

    # -- answers ---------------------------------------------------------------------------

    def _answer(self, key: str | None, req: dict[str, Any], model: str) -> dict[str, Any]:
        """One request's result: `{"response": GenerateContentResponse}` or `{"error": Status}`."""
        text = last_user_text(req)
        if "FAIL400" in text:
            return {"error": {"code": 400, "message": "fake: invalid argument", "status": "INVALID_ARGUMENT"}}
        if "FAIL429" in text and (key or text) not in self.failed_once:
            self.failed_once.add(key or text)
            return {"error": {"code": 429, "message": "fake: resource exhausted", "status": "RESOURCE_EXHAUSTED"}}
        return {"response": self._response(req, text, model)}

    def _response(self, req: dict[str, Any], text: str, model: str) -> dict[str, Any]:
        config = _get(req, "generationConfig") or {}
        prompt_words = sum(
            len(p.get("text", "").split())
            for c in _get(req, "contents") or []
            for p in c.get("parts") or []
            if isinstance(p, dict)
        )
        usage = {
            "promptTokenCount": prompt_words + 3,
            "cachedContentTokenCount": 2,
            "thoughtsTokenCount": 4,
        }
        n = _get(config, "candidateCount") or 1
        if "BLOCK" in text:
            parts, finish, words = [], "SAFETY", []
        elif "TOOL" in text and _get(req, "tools"):
            decl = _get(_get(req, "tools")[0], "functionDeclarations")[0]
            call = {"name": decl["name"], "args": {"text": text}}
            parts, finish, words = [{"functionCall": call, "thoughtSignature": "c2ln"}], "STOP", ["call"]
        else:
            words, finish = text.split(), "STOP"
            limit = _get(config, "maxOutputTokens")
            if limit is not None and len(words) > limit:
                words, finish = words[:limit], "MAX_TOKENS"
            out = " ".join(words) if finish == "MAX_TOKENS" else text
            parts = [{"text": "Considering the echo.", "thought": True}, {"text": out}]
        candidates: list[dict[str, Any]] = [{"finishReason": finish, "index": i} for i in range(n)]
        for c in candidates:
            if parts:
                c["content"] = {"role": "model", "parts": parts}
        usage["candidatesTokenCount"] = len(words) * n
        usage["totalTokenCount"] = sum(usage.values()) - usage["cachedContentTokenCount"]
        return {
            "candidates": candidates,
            "usageMetadata": usage,
            "modelVersion": model.removeprefix("models/"),
            "responseId": secrets.token_hex(8),
        }

    def _embedding(self, key: str | None, req: dict[str, Any], model: str) -> dict[str, Any]:
        text = "".join(p.get("text", "") for p in (_get(req, "content") or {}).get("parts") or [])
        if "FAIL400" in text:
            return {"error": {"code": 400, "message": "fake: invalid argument", "status": "INVALID_ARGUMENT"}}
        values = embedding_of(text, _get(req, "outputDimensionality") or 4)
        # tokenCount is an int64, which Gemini's REST JSON writes as a string.
        return {"response": {"embedding": {"values": values}, "tokenCount": str(len(text.split()))}}

    # -- the direct API --------------------------------------------------------------------

    async def _generate(self, request: Request, model: str) -> Response:
        req = await request.json()
        with self.lock:
            self.direct_requests.append(req)
            self.direct_models.append(model)
            result = self._answer(None, req, f"models/{model}")
        if "error" in result:
            e = result["error"]
            return _error(e["code"], e["status"], e["message"])
        return JSONResponse(result["response"])

    async def _embed(self, request: Request, model: str) -> Response:
        body = await request.json()
        with self.lock:
            self.direct_requests.append(body)
            self.direct_models.append(model)
        out = []
        for req in body.get("requests") or []:
            text = "".join(p.get("text", "") for p in (_get(req, "content") or {}).get("parts") or [])
            out.append({"values": embedding_of(text, _get(req, "outputDimensionality") or 4)})
        return JSONResponse({"embeddings": out})


def embedding_of(text: str, dims: int) -> list[float]:
    """The fake's embedding of a text: deterministic, so tests can check it."""
    return [float(len(text))] + [float((sum(map(ord, text)) * (i + 1)) % 101) for i in range(dims - 1)]
