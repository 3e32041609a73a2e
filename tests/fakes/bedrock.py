"""A fake of S3 and the AWS Bedrock batch inference control plane, on one HTTP server
(shared/reference/provider-batch-apis.md, section 8; botocore's `bedrock` service model).

`bedrock_fake(**options)` returns `(app, fake)`: an ASGI app and the `FakeBedrock` holding its
state. boto3 reaches it with `endpoint_url` set to its URL (S3 path-style) and any static
credentials; the signature is not checked, only that a SigV4 `Authorization` header is there.

S3 (path-style `/{bucket}/{key}`): PutObject (with `x-amz-meta-*` metadata), HeadObject,
GetObject, DeleteObject, ListObjectsV2 (`?list-type=2&prefix=`), errors as S3's XML.

Bedrock (rest-json): `POST /model-invocation-job` (CreateModelInvocationJob; a repeated
`clientRequestToken` answers the job it made, as the real API's idempotency does),
`GET /model-invocation-job/{id}`, `GET /model-invocation-jobs` (`nameContains`,
`submitTimeAfter`, `nextToken`/`maxResults`; newest first), `POST /model-invocation-job/{id}/stop`;
errors as `{"message"}` with `x-amzn-ErrorType`.

A job goes Submitted -> Validating -> Scheduled -> InProgress, one state per poll, and ends
after `end_after_polls` polls (or `end_after_seconds`): it reads its input object and writes
`<output s3Uri><jobId>/<input name>.out`, one line per record in shuffled order (the docs do not
promise input order) with `recordId`, `modelInput` and `modelOutput` or `error`
(`{errorCode, errorMessage}`), and `manifest.json.out` with the counts. Completed when every
record succeeded, PartiallyCompleted otherwise. For a Claude model (`anthropic.claude` in the
model id) the input must be an Anthropic Messages body with `anthropic_version:
bedrock-2023-05-31` and no `model`; the output is a Messages response echoing the last user
text. `FAIL400` in that text makes the record's `error` 400. An input that does not parse, has
fewer than `min_records` records, or lacks `recordId`/`modelInput` fails the job.

Controls: `expire_next` ends the next job to end Expired with half its records answered;
`create_latency` delays create's answer after the job exists (a window for kills).
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["FakeBedrock", "FakeJob", "bedrock_fake", "ACCOUNT", "ROLE_ARN"]

ACCOUNT = "123456789012"
REGION = "us-east-1"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/llmbatch-test"
_STEPS = ("Submitted", "Validating", "Scheduled", "InProgress")
_ENDED = ("Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired")


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def bedrock_error(status: int, kind: str, message: str) -> Response:
    return Response(orjson.dumps({"message": message}), status, media_type="application/json",
                    headers={"x-amzn-ErrorType": kind})  # fmt: skip


def s3_error(status: int, code: str, message: str) -> Response:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return Response(body.encode(), status, media_type="application/xml")


def _split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@dataclass
class S3Object:
    data: bytes
    metadata: dict[str, str]
    modified: float


@dataclass
class FakeJob:
    arn: str
    name: str
    model: str
    role: str
    token: str | None
    input_uri: str
    output_uri: str
    submitted: float
    timeout_hours: int | None
    tags: list[dict[str, str]]
    status: str = "Submitted"
    polls: int = 0
    message: str | None = None
    ended: float | None = None
    stop_asked: bool = False
    stop_polls: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    #: The recordIds its input held when it was created (the input may be deleted later).
    record_ids: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.arn.rsplit("/", 1)[1]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobArn": self.arn, "jobName": self.name, "modelId": self.model, "roleArn": self.role,
            "status": self.status, "submitTime": iso(self.submitted),
            "lastModifiedTime": iso(self.ended or self.submitted),
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": self.input_uri, "s3InputFormat": "JSONL"}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": self.output_uri}},
        }  # fmt: skip
        if self.token:
            out["clientRequestToken"] = self.token
        if self.message:
            out["message"] = self.message
        if self.ended is not None:
            out["endTime"] = iso(self.ended)
        if self.timeout_hours:
            out["timeoutDurationInHours"] = self.timeout_hours
        out.update(self.counts)
        return out


class FakeBedrock:
    """State and controls of one fake S3 + Bedrock."""

    def __init__(
        self, *, end_after_polls: int | None = 3, end_after_seconds: float | None = None, min_records: int = 1,
        create_latency: float = 0.0, seed: int = 0,
    ) -> None:  # fmt: skip
        self.end_after_polls = end_after_polls
        self.end_after_seconds = end_after_seconds
        self.min_records = min_records
        self.create_latency = create_latency
        self.expire_next = False
        self.objects: dict[tuple[str, str], S3Object] = {}
        self.jobs: dict[str, FakeJob] = {}  # by job id
        self.calls: list[tuple[str, str]] = []
        self.url = ""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    @property
    def creates(self) -> int:
        return len(self.jobs)

    def job_records(self) -> dict[str, list[str]]:
        """job id -> the recordIds of its input, as sent."""
        return {job.id: job.record_ids for job in self.jobs.values()}

    # -- S3 ----------------------------------------------------------------------------------

    async def s3(self, request: Request) -> Response:
        bucket, key = request.path_params["bucket"], request.path_params.get("key", "")
        method = request.method
        self.calls.append((method, "s3:" + request.url.path + (f"?{request.url.query}" if request.url.query else "")))
        if not request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            return s3_error(403, "AccessDenied", "no SigV4 signature")
        if method == "GET" and not key:
            return self._list(bucket, request.query_params.get("prefix", ""))
        if method == "PUT":
            data = await request.body()
            meta = {k[len("x-amz-meta-") :]: v for k, v in request.headers.items() if k.startswith("x-amz-meta-")}
            with self._lock:
                self.objects[(bucket, key)] = S3Object(data, meta, time.time())
            return Response(b"", 200, headers={"ETag": f'"{uuid.uuid4().hex}"'})
        if method == "DELETE":
            with self._lock:
                self.objects.pop((bucket, key), None)
            return Response(b"", 204)
        obj = self.objects.get((bucket, key))
        if obj is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        headers = {f"x-amz-meta-{k}": v for k, v in obj.metadata.items()}
        headers["Last-Modified"] = dt.datetime.fromtimestamp(obj.modified, dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
        if method == "HEAD":
            return Response(b"", 200, headers={**headers, "Content-Length": str(len(obj.data))})
        return Response(obj.data, 200, headers=headers, media_type="application/octet-stream")

    def _list(self, bucket: str, prefix: str) -> Response:
        items = sorted((k, o) for (b, k), o in list(self.objects.items()) if b == bucket and k.startswith(prefix))
        contents = "".join(
            f"<Contents><Key>{k}</Key><LastModified>{iso(o.modified)}</LastModified><Size>{len(o.data)}</Size>"
            f"<StorageClass>STANDARD</StorageClass></Contents>"
            for k, o in items
        )
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><ListBucketResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'>"
            f"<Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>{len(items)}</KeyCount><MaxKeys>1000</MaxKeys>"
            f"<IsTruncated>false</IsTruncated>{contents}</ListBucketResult>"
        )
        return Response(body.encode(), 200, media_type="application/xml")

    # -- Bedrock -----------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        self.calls.append(("POST", "/model-invocation-job"))
        body = orjson.loads(await request.body())
        for required in ("jobName", "roleArn", "modelId", "inputDataConfig", "outputDataConfig"):
            if required not in body:
                return bedrock_error(400, "ValidationException", f"{required} is required")
        token = body.get("clientRequestToken")
        with self._lock:
            same = [j for j in self.jobs.values() if token and j.token == token]
            if same:
                return Response(orjson.dumps({"jobArn": same[0].arn}), 200, media_type="application/json")
            job_id = "".join(self._rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
            hours = body.get("timeoutDurationInHours")
            if hours is not None and not 24 <= hours <= 168:
                return bedrock_error(400, "ValidationException", "timeoutDurationInHours must be 24 to 168")
            job = FakeJob(
                arn=f"arn:aws:bedrock:{REGION}:{ACCOUNT}:model-invocation-job/{job_id}",
                name=body["jobName"], model=body["modelId"], role=body["roleArn"], token=token,
                input_uri=body["inputDataConfig"]["s3InputDataConfig"]["s3Uri"],
                output_uri=body["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"],
                submitted=time.time(), timeout_hours=hours, tags=body.get("tags") or [],
            )  # fmt: skip
            obj = self.objects.get(_split_uri(job.input_uri))
            try:
                job.record_ids = (
                    [orjson.loads(x).get("recordId") for x in obj.data.splitlines() if x.strip()] if obj else []
                )
            except orjson.JSONDecodeError:
                pass  # the job fails validation when it ends
            self.jobs[job_id] = job
        if self.create_latency:
            await anyio.sleep(self.create_latency)
        return Response(orjson.dumps({"jobArn": job.arn}), 200, media_type="application/json")

    def _job(self, ident: str) -> FakeJob | None:
        return self.jobs.get(ident.rsplit("/", 1)[-1])

    async def get(self, request: Request) -> Response:
        ident = request.path_params["ident"]
        self.calls.append(("GET", f"/model-invocation-job/{ident}"))
        job = self._job(ident)
        if job is None:
            return bedrock_error(404, "ResourceNotFoundException", f"no job {ident}")
        with self._lock:
            self._advance(job)
        return Response(orjson.dumps(job.summary()), 200, media_type="application/json")

    async def stop(self, request: Request) -> Response:
        ident = request.path_params["ident"]
        self.calls.append(("POST", f"/model-invocation-job/{ident}/stop"))
        job = self._job(ident)
        if job is None:
            return bedrock_error(404, "ResourceNotFoundException", f"no job {ident}")
        with self._lock:
            if job.status in _ENDED:
                return bedrock_error(400, "ValidationException", f"job {job.id} is {job.status}")
            job.status, job.stop_asked = "Stopping", True
        return Response(b"{}", 200, media_type="application/json")

    async def list(self, request: Request) -> Response:
        q = request.query_params
        self.calls.append(("GET", f"/model-invocation-jobs?{request.url.query}"))
        jobs = sorted(self.jobs.values(), key=lambda j: j.submitted, reverse=True)
        if "nameContains" in q:
            jobs = [j for j in jobs if q["nameContains"] in j.name]
        if "submitTimeAfter" in q:
            after = _parse_time(q["submitTimeAfter"])
            jobs = [j for j in jobs if j.submitted > after]
        start = int(q.get("nextToken", "0"))
        size = int(q.get("maxResults", "10"))
        page = jobs[start : start + size]
        out: dict[str, Any] = {"invocationJobSummaries": [j.summary() for j in page]}
        if start + size < len(jobs):
            out["nextToken"] = str(start + size)
        return Response(orjson.dumps(out), 200, media_type="application/json")

    # -- running a job -----------------------------------------------------------------------

    def _advance(self, job: FakeJob) -> None:
        if job.status in _ENDED:
            return
        job.polls += 1
        if job.status == "Stopping":  # stopping takes a poll, then the job ends Stopped
            job.stop_polls += 1
            if job.stop_polls > 1:
                self._finish(job, stopped=True)
            return
        due = self.end_after_polls is not None and job.polls >= self.end_after_polls
        late = self.end_after_seconds is not None and time.time() - job.submitted >= self.end_after_seconds
        if due or late:
            self._finish(job)
        else:
            job.status = _STEPS[min(job.polls, len(_STEPS) - 1)]

    def _finish(self, job: FakeJob, stopped: bool = False) -> None:
        job.ended = time.time()
        bucket, key = _split_uri(job.input_uri)
        obj = self.objects.get((bucket, key))
        try:
            if obj is None:
                raise ValueError(f"the input {job.input_uri} does not exist")
            records = [orjson.loads(x) for x in obj.data.splitlines() if x.strip()]
            if len(records) < self.min_records:
                raise ValueError(f"the job has {len(records)} records, fewer than the minimum {self.min_records}")
            for r in records:
                if not isinstance(r, dict) or "recordId" not in r or not isinstance(r.get("modelInput"), dict):
                    raise ValueError("every record needs a recordId and a modelInput object")
        except (ValueError, orjson.JSONDecodeError) as exc:
            job.status, job.message = "Failed", f"Input validation failed: {exc}"
            return
        expire = self.expire_next and not stopped
        self.expire_next = self.expire_next and not expire
        ran = records[: len(records) // 2] if (expire or stopped) else records
        lines = [self._answer(job, r) for r in ran]
        self._rng.shuffle(lines)
        errors = sum("error" in x for x in lines)
        out_bucket, out_prefix = _split_uri(job.output_uri)
        folder = f"{out_prefix.rstrip('/')}/{job.id}/" if out_prefix else f"{job.id}/"
        name = key.rsplit("/", 1)[-1]
        now = time.time()
        self.objects[(out_bucket, folder + name + ".out")] = S3Object(
            b"".join(orjson.dumps(x) + b"\n" for x in lines), {}, now
        )
        counts = {
            "totalRecordCount": len(records), "processedRecordCount": len(lines),
            "successRecordCount": len(lines) - errors, "errorRecordCount": errors,
        }  # fmt: skip
        self.objects[(out_bucket, folder + "manifest.json.out")] = S3Object(orjson.dumps(counts), {}, now)
        job.counts = counts
        job.status = (
            "Stopped" if stopped else "Expired" if expire else "Completed" if not errors else "PartiallyCompleted"
        )

    def _answer(self, job: FakeJob, record: dict[str, Any]) -> dict[str, Any]:
        line: dict[str, Any] = {"recordId": record["recordId"], "modelInput": record["modelInput"]}
        if "anthropic.claude" not in job.model:
            line["error"] = {"errorCode": 400, "errorMessage": f"the fake answers Claude models only, not {job.model}"}
            return line
        body = record["modelInput"]
        problem = None
        if body.get("anthropic_version") != "bedrock-2023-05-31":
            problem = "anthropic_version must be bedrock-2023-05-31"
        elif "model" in body:
            problem = "extraneous key [model] is not permitted"
        elif not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
            problem = "max_tokens and messages are required"
        text = _last_user_text(body.get("messages") or [])
        if problem is None and "FAIL400" in text:
            problem = "the fake refuses FAIL400"
        if problem is not None:
            line["error"] = {"errorCode": 400, "errorMessage": problem}
            return line
        words = text.split()
        out_words = words[: body["max_tokens"]]
        line["modelOutput"] = {
            "id": f"msg_bdrk_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": job.model.split(".", 1)[-1], "content": [{"type": "text", "text": " ".join(out_words)}],
            "stop_reason": "end_turn" if len(out_words) == len(words) else "max_tokens", "stop_sequence": None,
            "usage": {"input_tokens": max(1, len(words)), "output_tokens": len(out_words)},
        }  # fmt: skip
        return line


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            return content
        return " ".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")
    return ""


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{quote(key)}"


def bedrock_fake(**options: Any) -> tuple[Starlette, FakeBedrock]:
    fake = FakeBedrock(**options)
    routes = [
        Route("/model-invocation-job", fake.create, methods=["POST"]),
        Route("/model-invocation-jobs", fake.list, methods=["GET"]),
        # An ARN as the identifier arrives with its `/` escaped, decoded before routing.
        Route("/model-invocation-job/{ident:path}/stop", fake.stop, methods=["POST"]),
        Route("/model-invocation-job/{ident:path}", fake.get, methods=["GET"]),
        Route("/{bucket}", fake.s3, methods=["GET"]),
        Route("/{bucket}/{key:path}", fake.s3, methods=["GET", "PUT", "HEAD", "DELETE"]),
    ]
    return Starlette(routes=routes), fake
