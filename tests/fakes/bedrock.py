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
record succeeded, PartiallyCompleted otherwise. Each record's `modelInput` must be its model's
documented InvokeModel body (Claude: Anthropic Messages with `anthropic_version:
bedrock-2023-05-31` and no `model`; Llama 3: `prompt` in Llama 3's chat template and
`max_gen_len`/`temperature`/`top_p`; Mistral: a `<s>[INST] ... [/INST]` `prompt` and
`max_tokens`/`stop`/`temperature`/`top_p`/`top_k`; Nova: `messages-v1` with `inferenceConfig`),
unknown keys refused; the answer, in the model's documented response shape, echoes the last user
text. `FAIL400` in that text makes the record's `error` 400 (`BATCH500` a 500 in a batch only).
An input that does not parse, has
fewer than `min_records` records, or lacks `recordId`/`modelInput` fails the job.

bedrock-runtime: `POST /model/{modelId}/invoke` (InvokeModel) answers one body the same way,
with `X-Amzn-Bedrock-Input-Token-Count`/`-Output-Token-Count` headers; a refused body is a 400
ValidationException. Calls are kept in `invoked`.

Controls: `expire_next` ends the next job to end Expired with half its records answered;
`create_latency` delays create's answer after the job exists (a window for kills).
"""

from __future__ import annotations

import datetime as dt
import random
import re
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
        #: (model, body) of each InvokeModel call.
        self.invoked: list[tuple[str, dict[str, Any]]] = []
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
        if b"BATCH500" in orjson.dumps(record["modelInput"]):  # a batch's trouble: InvokeModel answers it
            line["error"] = {"errorCode": 500, "errorMessage": "the fake's batch failed this record"}
            return line
        output, problem = answer(job.model, record["modelInput"])
        if problem is not None:
            line["error"] = {"errorCode": 400, "errorMessage": problem}
        else:
            line["modelOutput"] = output
        return line

    # -- bedrock-runtime ---------------------------------------------------------------------

    async def invoke(self, request: Request) -> Response:
        """InvokeModel: `POST /model/{modelId}/invoke`, the model's native body in and out, the
        token counts in `X-Amzn-Bedrock-*-Token-Count` headers."""
        model = request.path_params["model"]
        self.calls.append(("POST", f"invoke:{model}"))
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return bedrock_error(400, "ValidationException", "Malformed input request")
        self.invoked.append((model, body))
        output, problem = answer(model, body)
        if problem is not None:
            return bedrock_error(400, "ValidationException", problem)
        assert output is not None
        counts = _token_counts(output)
        headers = {"X-Amzn-Bedrock-Input-Token-Count": str(counts[0]),
                   "X-Amzn-Bedrock-Output-Token-Count": str(counts[1])}  # fmt: skip
        return Response(orjson.dumps(output), 200, media_type="application/json", headers=headers)


# -- the models: each family's documented InvokeModel body, and an answer echoing its user text ------

_LLAMA_KEYS = {"prompt", "max_gen_len", "temperature", "top_p"}
_MISTRAL_KEYS = {"prompt", "max_tokens", "stop", "temperature", "top_p", "top_k"}
_NOVA_KEYS = {"schemaVersion", "system", "messages", "inferenceConfig", "toolConfig"}
_NOVA_CONFIG = {"maxTokens", "temperature", "topP", "topK", "stopSequences"}
_LLAMA_USER = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)
_MISTRAL_USER = re.compile(r"\[INST\] (.*?) \[/INST\]", re.S)


def answer(model: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the model's answer, None) or (None, why the body is refused). The answer's text is the
    last user text cut to the output cap in words; its tokens are words."""
    if "anthropic.claude" in model:
        return _claude(model, body)
    if "meta.llama" in model:
        if set(body) - _LLAMA_KEYS or not isinstance(body.get("prompt"), str):
            return None, f"Llama takes {sorted(_LLAMA_KEYS)}, a prompt required; got {sorted(body)}"
        if not body["prompt"].startswith("<|begin_of_text|>") or not body["prompt"].endswith(
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ):
            return None, "the fake wants Llama 3's chat template"
        users = _LLAMA_USER.findall(body["prompt"])
        words, cut, problem = _echo(users[-1] if users else "", body.get("max_gen_len", 512))
        if problem:
            return None, problem
        return {"generation": " ".join(cut), "prompt_token_count": max(1, len(words)),
                "generation_token_count": len(cut),
                "stop_reason": "stop" if len(cut) == len(words) else "length"}, None  # fmt: skip
    if "mistral." in model:
        if set(body) - _MISTRAL_KEYS or not isinstance(body.get("prompt"), str):
            return None, f"Mistral takes {sorted(_MISTRAL_KEYS)}, a prompt required; got {sorted(body)}"
        if not body["prompt"].startswith("<s>[INST] ") or not body["prompt"].endswith(" [/INST]"):
            return None, "the fake wants Mistral's <s>[INST] ... [/INST] prompt"
        users = _MISTRAL_USER.findall(body["prompt"])
        words, cut, problem = _echo(users[-1] if users else "", body.get("max_tokens", 512))
        if problem:
            return None, problem
        stop = "stop" if len(cut) == len(words) else "length"
        return {"outputs": [{"text": " ".join(cut), "stop_reason": stop}]}, None
    if "amazon.nova" in model:
        config = body.get("inferenceConfig") or {}
        if set(body) - _NOVA_KEYS or set(config) - _NOVA_CONFIG or body.get("schemaVersion") != "messages-v1":
            return None, f"Nova takes schemaVersion messages-v1, {sorted(_NOVA_KEYS)} and {sorted(_NOVA_CONFIG)}"
        msgs = body.get("messages") or []
        if not msgs or msgs[0].get("role") != "user":
            return None, "A conversation must start with a user message."
        users = [m for m in msgs if m.get("role") == "user"]
        text = " ".join(c.get("text", "") for c in users[-1].get("content") or [])
        words, cut, problem = _echo(text, config.get("maxTokens", 512))
        if problem:
            return None, problem
        n_in = max(1, len(words))
        usage = {"inputTokens": n_in, "outputTokens": len(cut), "totalTokens": n_in + len(cut)}
        return {"output": {"message": {"role": "assistant", "content": [{"text": " ".join(cut)}]}},
                "stopReason": "end_turn" if len(cut) == len(words) else "max_tokens", "usage": usage}, None  # fmt: skip
    return None, f"the fake does not serve {model}"


def _echo(text: str, cap: Any) -> tuple[list[str], list[str], str | None]:
    if "FAIL400" in text:
        return [], [], "the fake refuses FAIL400"
    if not isinstance(cap, int) or cap < 1:
        return [], [], f"the output cap must be a positive integer, not {cap!r}"
    words = text.split()
    return words, words[:cap], None


def _token_counts(output: dict[str, Any]) -> tuple[int, int]:
    if "usage" in output and "input_tokens" in output["usage"]:
        return output["usage"]["input_tokens"], output["usage"]["output_tokens"]
    if "generation" in output:
        return output["prompt_token_count"], output["generation_token_count"]
    if "outputs" in output:
        text = output["outputs"][0]["text"]
        return 7, len(text.split())  # the fake does not count Mistral's prompt
    return output["usage"]["inputTokens"], output["usage"]["outputTokens"]


def _claude(model: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    problem = None
    if body.get("anthropic_version") != "bedrock-2023-05-31":
        problem = "anthropic_version must be bedrock-2023-05-31"
    elif "model" in body:
        problem = "extraneous key [model] is not permitted"
    elif not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
        problem = "max_tokens and messages are required"
    if problem is not None:
        return None, problem
    words, cut, problem = _echo(_last_user_text(body.get("messages") or []), body["max_tokens"])
    if problem is not None:
        return None, problem
    return {
        "id": f"msg_bdrk_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
        "model": model.split(".", 1)[-1], "content": [{"type": "text", "text": " ".join(cut)}],
        "stop_reason": "end_turn" if len(cut) == len(words) else "max_tokens", "stop_sequence": None,
        "usage": {"input_tokens": max(1, len(words)), "output_tokens": len(cut)},
    }, None  # fmt: skip


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
        Route("/model/{model:path}/invoke", fake.invoke, methods=["POST"]),
        Route("/model-invocation-jobs", fake.list, methods=["GET"]),
        # An ARN as the identifier arrives with its `/` escaped, decoded before routing.
        Route("/model-invocation-job/{ident:path}/stop", fake.stop, methods=["POST"]),
        Route("/model-invocation-job/{ident:path}", fake.get, methods=["GET"]),
        Route("/{bucket}", fake.s3, methods=["GET"]),
        Route("/{bucket}/{key:path}", fake.s3, methods=["GET", "PUT", "HEAD", "DELETE"]),
    ]
    return Starlette(routes=routes), fake
