"""A fake of Cloud Storage's JSON API, Vertex AI's batchPredictionJobs and generateContent, and
Google's OAuth token endpoint, on one HTTP server (shared/reference/provider-batch-apis.md
section 9; what google-cloud-storage and google-genai's Vertex mode send).

`vertex_fake(**options)` returns `(app, fake)`. The SDKs reach it through `base_url` /
`api_endpoint`; credentials are a service account key file whose `token_uri` is this server's
`/token` (`service_account_file`), so google-auth's real token exchange runs and every other
call must carry the token it hands out.

Cloud Storage: uploads (`/upload/storage/v1/b/B/o?uploadType=media|multipart|resumable`, the
resumable session by PUTs with Content-Range), objects' metadata, listing (`prefix`,
`pageToken`), deletion, and media downloads (`/download/storage/v1/...?alt=media`, with an
`x-goog-hash` crc32c the client checks). Errors as `{"error": {code, message}}`.

Vertex (`/v1/projects/P/locations/L/...`): `batchPredictionJobs` create, get, list (`filter`
of `labels.K="V"` and `display_name="V"` clauses joined by AND; newest first; pages) and
`:cancel`; `publishers/google/models/M:generateContent`. A job goes JOB_STATE_PENDING, then
RUNNING, one state a poll, and ends after `end_after_polls` polls (or `end_after_seconds`): it
reads its input and writes `<outputUriPrefix>/prediction-model-<time>/predictions.jsonl`, one
line per request in shuffled order: the input line's extra fields (`key`) unless
`keep_keys=False`, `status`, `processed_time`, `request`, and `response` for a request that
ran. A request's last user text is echoed with usage; `FAIL400` in it fails it (its `status` is
the error text). An input that does not parse or lacks a `request` fails the job.

Controls: `expire_next` ends the next job EXPIRED with half its requests answered; a cancelled
job ends CANCELLED a poll later, with half answered; `create_latency` delays create's answer
after the job exists (a window for kills).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import random
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import google_crc32c
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .gemini import last_user_text

__all__ = ["FakeVertex", "FakeJob", "vertex_fake", "service_account_file", "PROJECT", "LOCATION"]

PROJECT = "llmbatch-test"
LOCATION = "us-central1"
_ENDED = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}
_JOBS = re.compile(r"^/v1/projects/([^/]+)/locations/([^/]+)/batchPredictionJobs(?:/(\d+))?(:cancel)?$")
_GENERATE = re.compile(r"^/v1/projects/([^/]+)/locations/([^/]+)/publishers/google/models/([^/:]+):generateContent$")
_CLAUSE = re.compile(r'^\s*(labels\.[a-z0-9_-]+|display_name)\s*=\s*"([^"]*)"\s*$')


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def error(code: int, message: str, status: str = "INVALID_ARGUMENT") -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "status": status}}, status_code=code)


@functools.cache
def _private_key() -> str:
    """An RSA key for the fake service account (made once: it takes a moment)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def service_account_file(path: Path, token_uri: str) -> Path:
    """Writes a service account key file whose token exchange goes to `token_uri` (the fake's /token)."""
    info = {
        "type": "service_account", "project_id": PROJECT, "private_key_id": "k1", "private_key": _private_key(),
        "client_email": f"llmbatch@{PROJECT}.iam.gserviceaccount.com", "client_id": "1", "token_uri": token_uri,
    }  # fmt: skip
    path.write_text(json.dumps(info))
    return path


@dataclass
class GcsObject:
    data: bytes
    metadata: dict[str, str]
    content_type: str
    created: float
    generation: int

    def json(self, bucket: str, name: str) -> dict[str, Any]:
        crc = base64.b64encode(google_crc32c.Checksum(self.data).digest()).decode()
        return {
            "kind": "storage#object", "id": f"{bucket}/{name}/{self.generation}", "name": name, "bucket": bucket,
            "generation": str(self.generation), "metageneration": "1", "contentType": self.content_type,
            "size": str(len(self.data)), "crc32c": crc, "metadata": self.metadata,
            "timeCreated": iso(self.created), "updated": iso(self.created),
        }  # fmt: skip


@dataclass
class FakeJob:
    id: str
    display_name: str
    model: str
    input_uri: str
    output_prefix: str
    labels: dict[str, str]
    created: float
    #: The keys of its input when it was created (the input may be deleted later).
    keys: list[str] = field(default_factory=list)
    state: str = "JOB_STATE_PENDING"
    polls: int = 0
    cancel_polls: int = 0
    ended: float | None = None
    error: dict[str, Any] | None = None
    output_dir: str | None = None
    stats: dict[str, str] = field(default_factory=dict)

    def name(self, project: str, location: str) -> str:
        return f"projects/{project}/locations/{location}/batchPredictionJobs/{self.id}"

    def json(self, project: str, location: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name(project, location), "displayName": self.display_name, "model": self.model,
            "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [self.input_uri]}},
            "outputConfig": {"predictionsFormat": "jsonl", "gcsDestination": {"outputUriPrefix": self.output_prefix}},
            "state": self.state, "labels": self.labels, "createTime": iso(self.created),
            "updateTime": iso(self.ended or self.created),
        }  # fmt: skip
        if self.ended is not None:
            out["endTime"] = iso(self.ended)
        if self.error:
            out["error"] = self.error
        if self.output_dir:
            out["outputInfo"] = {"gcsOutputDirectory": self.output_dir}
        if self.stats:
            out["completionStats"] = self.stats
        return out


class FakeVertex:
    """State and controls of one fake Cloud Storage + Vertex AI."""

    def __init__(
        self, *, end_after_polls: int | None = 3, end_after_seconds: float | None = None, keep_keys: bool = True,
        create_latency: float = 0.0, seed: int = 0,
    ) -> None:  # fmt: skip
        self.end_after_polls = end_after_polls
        self.end_after_seconds = end_after_seconds
        self.keep_keys = keep_keys
        self.create_latency = create_latency
        self.expire_next = False
        self.objects: dict[tuple[str, str], GcsObject] = {}
        self.jobs: dict[str, FakeJob] = {}
        self.calls: list[tuple[str, str]] = []
        self.tokens: set[str] = set()
        self.generated: list[dict[str, Any]] = []
        self._resumable: dict[str, tuple[str, str, dict[str, Any], bytearray]] = {}
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._generation = 0

    @property
    def creates(self) -> int:
        return len(self.jobs)

    # -- dispatch ----------------------------------------------------------------------------

    async def dispatch(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        self.calls.append((method, path + (f"?{request.url.query}" if request.url.query else "")))
        if path == "/token" and method == "POST":
            token = "ya29." + secrets.token_hex(8)
            self.tokens.add(token)
            return JSONResponse({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
        auth = request.headers.get("authorization", "")
        if auth.removeprefix("Bearer ") not in self.tokens:
            return error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED")
        if path.startswith("/upload/storage/v1/b/"):
            return await self._upload(request, path.split("/")[5])
        if path.startswith("/download/storage/v1/b/"):
            bucket, _, name = path.removeprefix("/download/storage/v1/b/").partition("/o/")
            return self._media(bucket, name)
        if path.startswith("/storage/v1/b/"):
            return self._storage(request, path.removeprefix("/storage/v1/b/"))
        m = _JOBS.match(path)
        if m:
            return await self._jobs(request, m.group(1), m.group(2), m.group(3), bool(m.group(4)))
        m = _GENERATE.match(path)
        if m and method == "POST":
            body = orjson.loads(await request.body())
            self.generated.append(body)
            answer = self._answer(body)
            if "response" not in answer:
                return error(400, answer["status"])
            return JSONResponse(answer["response"])
        return error(404, f"no route for {method} {path}", "NOT_FOUND")

    # -- Cloud Storage -----------------------------------------------------------------------

    def _put(self, bucket: str, name: str, data: bytes, meta: dict[str, Any]) -> JSONResponse:
        with self._lock:
            self._generation += 1
            content_type = meta.get("contentType") or "application/octet-stream"
            obj = GcsObject(data, dict(meta.get("metadata") or {}), content_type, time.time(), self._generation)
            self.objects[(bucket, name)] = obj
        return JSONResponse(obj.json(bucket, name))

    async def _upload(self, request: Request, bucket: str) -> Response:
        kind = request.query_params.get("uploadType")
        body = await request.body()
        if kind == "media":
            meta = {"contentType": request.headers.get("content-type")}
            return self._put(bucket, request.query_params["name"], body, meta)
        if kind == "multipart":
            boundary = request.headers["content-type"].split("boundary=", 1)[1].strip('"').encode()
            parts = [p for p in body.split(b"--" + boundary) if p.strip() and p.strip() != b"--"]
            head, _, meta_raw = parts[0].partition(b"\r\n\r\n")
            media_head, _, data = parts[1].partition(b"\r\n\r\n")
            meta = orjson.loads(meta_raw.strip())
            content_type = re.search(rb"content-type:\s*([^\r\n]+)", media_head, re.I)
            meta.setdefault("contentType", content_type.group(1).decode() if content_type else None)
            return self._put(bucket, meta["name"], data.removesuffix(b"\r\n"), meta)
        if kind == "resumable" and request.method == "POST":
            meta = orjson.loads(body) if body else {}
            meta.setdefault("contentType", request.headers.get("x-upload-content-type"))
            upload_id = uuid.uuid4().hex
            self._resumable[upload_id] = (bucket, meta.get("name") or request.query_params["name"], meta, bytearray())
            location = f"{request.base_url}upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return Response(b"", 200, headers={"Location": location})
        if kind == "resumable" and request.method == "PUT":
            name_bucket, name, meta, buf = self._resumable[request.query_params["upload_id"]]
            buf.extend(body)
            total = request.headers.get("content-range", "").rpartition("/")[2]
            if total != "*" and int(total) == len(buf):
                del self._resumable[request.query_params["upload_id"]]
                return self._put(name_bucket, name, bytes(buf), meta)
            return Response(b"", 308, headers={"Range": f"bytes=0-{len(buf) - 1}"})
        return error(400, f"uploadType {kind!r} is not supported by the fake")

    def _storage(self, request: Request, rest: str) -> Response:
        bucket, _, tail = rest.partition("/o")
        if not tail and request.method == "GET" and not rest.endswith("/o"):
            return JSONResponse({"kind": "storage#bucket", "name": bucket, "id": bucket, "location": "US-CENTRAL1"})
        name = tail.removeprefix("/")
        if not name:  # a listing
            prefix = request.query_params.get("prefix", "")
            names = sorted(n for (b, n) in list(self.objects) if b == bucket and n.startswith(prefix))
            start = int(request.query_params.get("pageToken", "0"))
            size = int(request.query_params.get("maxResults", "3"))  # small pages, so that paging is exercised
            page = names[start : start + size]
            out: dict[str, Any] = {
                "kind": "storage#objects",
                "items": [self.objects[(bucket, n)].json(bucket, n) for n in page],
            }
            if start + size < len(names):
                out["nextPageToken"] = str(start + size)
            return JSONResponse(out)
        obj = self.objects.get((bucket, name))
        if request.method == "DELETE":
            with self._lock:
                gone = self.objects.pop((bucket, name), None)
            return Response(b"", 204) if gone else error(404, f"No such object: {bucket}/{name}", "NOT_FOUND")
        if obj is None:
            return error(404, f"No such object: {bucket}/{name}", "NOT_FOUND")
        if request.query_params.get("alt") == "media":
            return self._media(bucket, name)
        return JSONResponse(obj.json(bucket, name))

    def _media(self, bucket: str, name: str) -> Response:
        obj = self.objects.get((bucket, name))
        if obj is None:
            return error(404, f"No such object: {bucket}/{name}", "NOT_FOUND")
        crc = base64.b64encode(google_crc32c.Checksum(obj.data).digest()).decode()
        headers = {"x-goog-hash": f"crc32c={crc}", "x-goog-generation": str(obj.generation)}
        return Response(obj.data, 200, headers=headers, media_type=obj.content_type)

    # -- Vertex batch jobs -------------------------------------------------------------------

    async def _jobs(self, request: Request, project: str, location: str, ident: str | None, cancel: bool) -> Response:
        if request.method == "POST" and ident is None:
            return await self._create(request, project, location)
        if request.method == "GET" and ident is None:
            return self._list(request, project, location)
        job = self.jobs.get(ident or "")
        if job is None:
            return error(404, f"no batch prediction job {ident}", "NOT_FOUND")
        with self._lock:
            if cancel:
                if job.state in _ENDED:
                    return error(400, f"job {job.id} is {job.state}", "FAILED_PRECONDITION")
                job.state = "JOB_STATE_CANCELLING"
                return JSONResponse({})
            self._advance(job)
        return JSONResponse(job.json(project, location))

    async def _create(self, request: Request, project: str, location: str) -> Response:
        body = orjson.loads(await request.body())
        for required in ("displayName", "model", "inputConfig", "outputConfig"):
            if required not in body:
                return error(400, f"{required} is required")
        if not body["model"].startswith("publishers/google/models/"):
            return error(400, f"model {body['model']!r}: expected publishers/google/models/MODEL")
        source = body["inputConfig"]
        if source.get("instancesFormat") != "jsonl" or len((source.get("gcsSource") or {}).get("uris") or []) != 1:
            return error(400, "inputConfig: one jsonl gcsSource uri expected")
        dest = body["outputConfig"]
        if dest.get("predictionsFormat") != "jsonl" or not (dest.get("gcsDestination") or {}).get("outputUriPrefix"):
            return error(400, "outputConfig: a jsonl gcsDestination expected")
        labels = body.get("labels") or {}
        for k, v in labels.items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", k) or not re.fullmatch(r"[a-z0-9_-]{0,63}", v):
                return error(400, f"label {k}={v!r} is not a valid label")
        with self._lock:
            job = FakeJob(
                id=str(self._rng.randrange(10**17, 10**18)), display_name=body["displayName"], model=body["model"],
                input_uri=source["gcsSource"]["uris"][0], output_prefix=dest["gcsDestination"]["outputUriPrefix"],
                labels=labels, created=time.time(),
            )  # fmt: skip
            obj = self.objects.get(_split(job.input_uri))
            try:
                job.keys = [orjson.loads(x).get("key") for x in obj.data.splitlines() if x.strip()] if obj else []
            except orjson.JSONDecodeError:
                pass  # the job fails when it runs
            self.jobs[job.id] = job
        if self.create_latency:
            await anyio.sleep(self.create_latency)
        return JSONResponse(job.json(project, location))

    def _list(self, request: Request, project: str, location: str) -> Response:
        jobs = sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)
        flt = request.query_params.get("filter", "")
        for clause in filter(None, flt.split(" AND ")):
            m = _CLAUSE.match(clause)
            if m is None:
                return error(400, f"filter clause {clause!r} is not supported by the fake")
            what, value = m.groups()
            if what == "display_name":
                jobs = [j for j in jobs if j.display_name == value]
            else:
                jobs = [j for j in jobs if j.labels.get(what.removeprefix("labels.")) == value]
        start = int(request.query_params.get("pageToken", "0"))
        size = int(request.query_params.get("pageSize", "10"))
        out: dict[str, Any] = {"batchPredictionJobs": [j.json(project, location) for j in jobs[start : start + size]]}
        if start + size < len(jobs):
            out["nextPageToken"] = str(start + size)
        return JSONResponse(out)

    # -- running a job -----------------------------------------------------------------------

    def _advance(self, job: FakeJob) -> None:
        if job.state in _ENDED:
            return
        job.polls += 1
        if job.state == "JOB_STATE_CANCELLING":  # the first poll after a cancel still sees it cancelling
            job.cancel_polls += 1
            if job.cancel_polls > 1:
                self._finish(job, "JOB_STATE_CANCELLED")
            return
        due = self.end_after_polls is not None and job.polls >= self.end_after_polls
        late = self.end_after_seconds is not None and time.time() - job.created >= self.end_after_seconds
        if due or late:
            expire, self.expire_next = self.expire_next, False
            self._finish(job, "JOB_STATE_EXPIRED" if expire else "JOB_STATE_SUCCEEDED")
        else:
            job.state = "JOB_STATE_RUNNING"

    def _finish(self, job: FakeJob, state: str) -> None:
        job.ended = time.time()
        obj = self.objects.get(_split(job.input_uri))
        try:
            if obj is None:
                raise ValueError(f"the input {job.input_uri} does not exist")
            records = [orjson.loads(x) for x in obj.data.splitlines() if x.strip()]
            if not all(isinstance(r, dict) and isinstance(r.get("request"), dict) for r in records):
                raise ValueError("every line needs a request object")
        except (ValueError, orjson.JSONDecodeError) as exc:
            job.state, job.error = "JOB_STATE_FAILED", {"code": 3, "message": f"Failed to read the input: {exc}"}
            return
        ran = records if state == "JOB_STATE_SUCCEEDED" else records[: len(records) // 2]
        lines = []
        for r in ran:
            line = {k: v for k, v in r.items() if k != "request" and self.keep_keys}
            line.update({"processed_time": iso(time.time()), **self._answer(r["request"]), "request": r["request"]})
            lines.append(line)
        self._rng.shuffle(lines)
        failed = sum(1 for x in lines if x["status"])
        bucket, prefix = _split(job.output_prefix)
        folder = f"{prefix.rstrip('/')}/prediction-model-{dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"
        data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
        self._put(bucket, f"{folder}/predictions.jsonl", data, {"contentType": "application/jsonl"})
        job.output_dir = f"gs://{bucket}/{folder}"
        job.stats = {"successfulCount": str(len(lines) - failed), "failedCount": str(failed)}
        if len(ran) < len(records):
            job.stats["incompleteCount"] = str(len(records) - len(ran))
        job.state = state

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """`{"status": "", "response": ...}`, or `{"status": error text}` for a request that fails."""
        text = last_user_text(request)
        if "FAIL400" in text:
            return {"status": "Bad Request: INVALID_ARGUMENT: the fake refuses FAIL400"}
        words = text.split()
        limit = (request.get("generationConfig") or {}).get("maxOutputTokens")
        out = words[:limit] if limit is not None else words
        response = {
            "candidates": [{"content": {"role": "model", "parts": [{"text": " ".join(out)}]},
                            "finishReason": "MAX_TOKENS" if len(out) < len(words) else "STOP"}],
            "usageMetadata": {"promptTokenCount": len(words) + 1, "candidatesTokenCount": len(out),
                              "totalTokenCount": len(words) + 1 + len(out)},
            "modelVersion": "gemini-2.5-flash-001", "responseId": "resp-" + uuid.uuid4().hex[:16],
        }  # fmt: skip
        return {"status": "", "response": response}


def _split(uri: str) -> tuple[str, str]:
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return bucket, name


def gcs_uri(bucket: str, name: str) -> str:
    return f"gs://{bucket}/{quote(name)}"


def vertex_fake(**options: Any) -> tuple[Starlette, FakeVertex]:
    fake = FakeVertex(**options)
    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", fake.dispatch, methods=methods)]), fake
