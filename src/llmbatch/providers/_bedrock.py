"""AWS Bedrock batch inference, through boto3 (`pip install "llmbatch[bedrock]"`).

A batch is a model invocation job: its input is a JSONL object in S3 of
`{"recordId", "modelInput"}` lines, where `modelInput` is the model's InvokeModel body; its
output is written by Bedrock to `<output s3Uri><jobId>/<input name>.out`, one
`{"recordId", "modelInput", "modelOutput"}` line per record (`error: {errorCode, errorMessage}`
instead of `modelOutput` for a record that failed), in no promised order.

Where things go (`--s3-uri s3://bucket/prefix`, or LLMBATCH_BEDROCK_S3_URI): a chunk's input is
`<prefix>/<tag>/<tag>.jsonl`, with the model id in its metadata (S3 URIs Bedrock accepts
cannot hold a model id's `:`); its job writes under `<prefix>/<tag>/output/`. The job runs as
`--role-arn` (or LLMBATCH_BEDROCK_ROLE_ARN), a role Bedrock assumes to read and write there.
Credentials and region come from boto3's usual chain (environment, profile, instance role);
`--base-url` points both S3 (path-style) and Bedrock at another endpoint.

Exactly once: the job's name is `llmbatch-` and the chunk's tag (`_` made `-`, as job names
allow neither), and its `clientRequestToken` the same: a create retried after a lost answer
gets the job it made, and after a crash `find_batch` lists jobs by `nameContains`. A job's id
for the runner is its ARN.

Models: Claude, Llama 3/4, Mistral and Nova (also through inference profiles such as
`us.anthropic.claude-...`): rows are translated into each family's InvokeModel body
(`_bedrock_models`; the model goes in the job, not the body) and answers back into OpenAI chat
completions; what does not translate is refused at ingest. The direct API (`--direct-below`,
and rows too few for a job) is InvokeModel through bedrock-runtime with the same bodies.

Limits (Bedrock's default quotas): at least 100 and at most 50,000 records per job, 1 GB per
input file (a chunk is one file, so this binds before the 5 GB per job).

Statuses: Submitted and Validating are validating; Scheduled and InProgress in progress;
Completed and PartiallyCompleted completed (failed records are error lines); Failed failed
(its message as the error); Stopping cancelling; Stopped cancelled; Expired expired. Records a
stopped or expired job did not run have no line: the runner sends them again.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions
import orjson
from botocore.config import Config

from .._exceptions import ConfigError, ProviderError
from ._anthropic_translate import DEFAULT_MAX_TOKENS, Untranslatable
from ._base import TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus
from ._bedrock_models import completion_of, model_input, request_reasons
from ._chat import error_result, error_type, result_line

__all__ = ["BEDROCK_LIMITS", "BedrockBatchProvider", "job_name", "tag_of_job_name"]

T = TypeVar("T")

S3_URI_ENV = "LLMBATCH_BEDROCK_S3_URI"
ROLE_ARN_ENV = "LLMBATCH_BEDROCK_ROLE_ARN"
#: Bedrock's default quotas: 100 to 50,000 records per job (and per input file), 1 GB per input file.
BEDROCK_LIMITS = ProviderLimits(max_requests=50_000, min_requests=100, max_bytes=1_000_000_000, max_in_flight=10)
_NAME_PREFIX = "llmbatch-"
_MODEL_META = "llmbatch-model"
_STATUS = {
    "Submitted": RemoteStatus.VALIDATING,
    "Validating": RemoteStatus.VALIDATING,
    "Scheduled": RemoteStatus.IN_PROGRESS,
    "InProgress": RemoteStatus.IN_PROGRESS,
    "Completed": RemoteStatus.COMPLETED,
    "PartiallyCompleted": RemoteStatus.COMPLETED,
    "Failed": RemoteStatus.FAILED,
    "Stopping": RemoteStatus.CANCELLING,
    "Stopped": RemoteStatus.CANCELLED,
    "Expired": RemoteStatus.EXPIRED,
}
#: Statuses whose job may have written results.
_WITH_OUTPUT = frozenset({"Completed", "PartiallyCompleted", "Stopped", "Expired"})


def job_name(tag: str) -> str:
    """The job name (and client token) of a chunk: names take letters, digits and `-` (`job_ab-c00001`
    becomes `llmbatch-job-ab-c00001`)."""
    return _NAME_PREFIX + tag.replace("_", "-")


def tag_of_job_name(name: str) -> str | None:
    """The chunk tag a job name was made from (tags are `job_<hex>-c<n>`); None for other jobs."""
    if not name.startswith(_NAME_PREFIX + "job-"):
        return None
    return "job_" + name[len(_NAME_PREFIX + "job-") :]


def split_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix without slashes at its ends) of `s3://bucket/prefix`."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise ConfigError(f"--s3-uri must look like s3://bucket/prefix, not {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def _hours(window: str) -> int:
    m = re.fullmatch(r"(\d+)h", window)
    if m is None or not 24 <= int(m.group(1)) <= 168:
        raise ConfigError(f"Bedrock jobs take a window of 24h to 168h, not {window!r}")
    return int(m.group(1))


def record_line(custom_id: str, body: dict[str, Any]) -> bytes:
    """The batch input line of a row: its id and its model's InvokeModel body."""
    return orjson.dumps({"recordId": custom_id, "modelInput": model_input(str(body.get("model") or ""), body)})


def openai_line(rec: dict[str, Any], model: str, created: int) -> dict[str, Any]:
    """An OpenAI batch output line for one Bedrock output line (its modelInput left out of `native`)."""
    cid = rec.get("recordId")
    native = {k: v for k, v in rec.items() if k != "modelInput"}
    err = rec.get("error")
    if err is not None:
        code = err.get("errorCode") if isinstance(err, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        message = str(err.get("errorMessage") if isinstance(err, dict) else err)
        return error_result(cid, status, message, type="bedrock_error", native=native)  # type: ignore[arg-type]
    output = rec.get("modelOutput")
    if not isinstance(output, dict):
        return error_result(cid, 500, "the Bedrock output line has neither modelOutput nor error", native=native)  # type: ignore[arg-type]
    try:
        body = completion_of(output, model, created, id=f"chatcmpl-bedrock-{cid}")
    except ValueError as exc:
        return error_result(cid, 500, str(exc), native=native)  # type: ignore[arg-type]
    return result_line(cid, 200, body, request_id=output.get("id"), native=native)  # type: ignore[arg-type]


class BedrockBatchProvider(Provider):
    """Bedrock batch inference in the region boto3 finds (or `region`)."""

    name = "bedrock"
    endpoints = frozenset({"/v1/chat/completions"})
    custom_id_pattern = re.compile(r"[a-zA-Z0-9_-]{1,64}")
    default_max_tokens = DEFAULT_MAX_TOKENS

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        limits: ProviderLimits | None = None,
        s3_uri: str | None = None,
        role_arn: str | None = None,
        region: str | None = None,
        max_retries: int = 5,
    ) -> None:
        if api_key:
            raise ConfigError("the bedrock provider takes AWS credentials (boto3's chain), not --api-key")
        uri = s3_uri or os.environ.get(S3_URI_ENV)
        if not uri:
            raise ConfigError(f"the bedrock provider needs an S3 location for its files: --s3-uri or {S3_URI_ENV}")
        self.bucket, self.prefix = split_s3_uri(uri)
        self.role_arn = role_arn or os.environ.get(ROLE_ARN_ENV)
        if not self.role_arn:
            raise ConfigError(f"the bedrock provider needs the role its jobs run as: --role-arn or {ROLE_ARN_ENV}")
        self.limits = limits or BEDROCK_LIMITS
        self._models: dict[str, str] = {}  # results file -> its job's model
        self.base_url = base_url
        config = Config(retries={"max_attempts": max_retries + 1, "mode": "standard"}, s3={"addressing_style": "path"})
        session = boto3.session.Session(region_name=region)
        try:
            self._s3 = session.client("s3", endpoint_url=base_url, config=config)
            self._bedrock = session.client("bedrock", endpoint_url=base_url, config=config)
            # Direct calls are one attempt each: the runner retries a failed row itself.
            self._runtime = session.client("bedrock-runtime", endpoint_url=base_url,
                                           config=config.merge(Config(retries={"max_attempts": 1})))  # fmt: skip
        except botocore.exceptions.NoRegionError as exc:
            raise ConfigError("the bedrock provider needs a region: set AWS_REGION or a profile's region") from exc

    @classmethod
    def check_request(cls, endpoint: str, body: dict[str, Any]) -> list[str]:
        return cls.check_and_measure("x", endpoint, body)[0]

    @classmethod
    def check_and_measure(cls, custom_id: str, endpoint: str, body: dict[str, Any]) -> tuple[list[str], int | None]:
        """The record line `upload` writes, and its newline."""
        reasons = super().check_request(endpoint, body)
        if reasons:
            return reasons, None
        reasons = request_reasons(str(body.get("model") or ""), body)
        if reasons:
            return reasons, None
        return [], len(record_line(custom_id, body)) + 1

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Runs a boto3 call in a thread (boto3 is synchronous), translating its errors here."""
        try:
            return await asyncio.to_thread(fn)
        except botocore.exceptions.ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 500
            raise ProviderError(
                f"{what} failed: HTTP {status} {err.get('Code')}: {err.get('Message')}",
                status=status,
                body=exc.response,
            ) from exc
        except botocore.exceptions.NoCredentialsError as exc:
            raise ConfigError(f"{what}: no AWS credentials found (boto3's chain: environment, profile, role)") from exc
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError) as exc:
            raise ProviderError(f"{what} failed: cannot reach AWS: {exc}") from exc

    # -- submitting ----------------------------------------------------------------------

    def _key(self, tag: str, name: str) -> str:
        return f"{self.prefix}/{tag}/{name}" if self.prefix else f"{tag}/{name}"

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def upload(self, tag: str, path: Path) -> str:
        dest = path.with_name(tag + ".bedrock.jsonl")
        model = None
        with open(path, "rb") as src, open(dest, "wb") as out:
            for raw in src:
                if not raw.strip():
                    continue
                rec = orjson.loads(raw)
                model = model or rec["body"].get("model")
                try:
                    out.write(record_line(rec["custom_id"], rec["body"]) + b"\n")
                except Untranslatable as exc:  # check_request refuses these at ingest
                    raise ProviderError(f"row {rec.get('custom_id')} cannot go to Bedrock: {exc}", status=400) from exc
        key = self._key(tag, tag + ".jsonl")
        try:
            with open(dest, "rb") as fh:
                await self._call(
                    f"uploading chunk {tag} to {self._uri(key)}",
                    lambda: self._s3.put_object(
                        Bucket=self.bucket, Key=key, Body=fh, Metadata={_MODEL_META: str(model)}
                    ),
                )
        finally:
            dest.unlink(missing_ok=True)
        return self._uri(key)

    async def find_upload(self, tag: str, since: int) -> str | None:
        key = self._key(tag, tag + ".jsonl")
        listed = await self._call(
            "listing uploads", lambda: self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self._key(tag, ""))
        )
        for obj in listed.get("Contents", []):
            if obj["Key"] == key and obj["LastModified"].timestamp() >= since - 1:
                return self._uri(key)
        return None

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        if endpoint not in self.endpoints:
            raise ConfigError(f"the {self.name} provider cannot batch {endpoint}")
        hours = _hours(completion_window)
        bucket, key = split_s3_uri(file_id)
        head = await self._call(f"reading {file_id}", lambda: self._s3.head_object(Bucket=bucket, Key=key))
        model = head.get("Metadata", {}).get(_MODEL_META)
        if not model:
            raise ProviderError(f"chunk {tag}: its upload {file_id} names no model", status=400)
        name = job_name(tag)
        # The token makes a repeated create (an SDK retry after a lost answer) return the same job.
        made = await self._call(
            "creating a job",
            lambda: self._bedrock.create_model_invocation_job(
                jobName=name, clientRequestToken=name, roleArn=self.role_arn, modelId=model,
                inputDataConfig={"s3InputDataConfig": {"s3Uri": file_id, "s3InputFormat": "JSONL"}},
                outputDataConfig={"s3OutputDataConfig": {"s3Uri": self._uri(self._key(tag, "output/"))}},
                timeoutDurationInHours=hours,
                tags=[{"key": "llmbatch_job", "value": job}, {"key": TAG_KEY, "value": tag}],
            ),
        )  # fmt: skip
        return await self.get_batch(made["jobArn"])

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        name = job_name(tag)
        found = [j for j in await self._list(name, since) if j["jobName"] == name]
        if not found:
            return None
        # The client token makes a second job for one name unlikely; the oldest is the one created first.
        found.sort(key=lambda j: j["submitTime"])
        return self._remote(found[0])

    async def _list(self, name_contains: str, since: int) -> list[dict[str, Any]]:
        after = since - 60  # a minute of clock skew between this machine and AWS

        def scan() -> list[dict[str, Any]]:
            jobs: list[dict[str, Any]] = []
            pages = self._bedrock.get_paginator("list_model_invocation_jobs").paginate(
                nameContains=name_contains, submitTimeAfter=after, PaginationConfig={"PageSize": 100}
            )
            for page in pages:
                jobs.extend(page.get("invocationJobSummaries", []))
            return jobs

        return await self._call("listing jobs", scan)

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        found = []
        for j in await self._list(job_name(job_id), since):
            tag = tag_of_job_name(j["jobName"])
            if tag is not None and tag.startswith(f"{job_id}-c"):
                remote = self._remote(j)
                remote.metadata[TAG_KEY] = tag
                found.append(remote)
        return found

    # -- polling, results, cancelling ------------------------------------------------------

    def _remote(self, j: dict[str, Any]) -> RemoteBatch:
        status = j["status"]
        input_uri = j["inputDataConfig"]["s3InputDataConfig"]["s3Uri"]
        output: str | None = None
        # A job stopped or expired before any record ran wrote no results file: its rows go again.
        ran = status in ("Completed", "PartiallyCompleted") or int(j.get("processedRecordCount") or 0) > 0
        if status in _WITH_OUTPUT and ran:
            folder = j["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"].rstrip("/")
            output = f"{folder}/{j['jobArn'].rsplit('/', 1)[1]}/{input_uri.rsplit('/', 1)[1]}.out"
            # The results name no model (but Claude's): the job's is put on their completions.
            self._models[output] = str(j.get("modelId") or "")
        errors = [{"code": "job_failed", "message": j.get("message") or "the job failed"}] if status == "Failed" else []
        return RemoteBatch(
            id=j["jobArn"],
            status=_STATUS.get(status, RemoteStatus.IN_PROGRESS),
            output_file_id=output,
            total=int(j.get("totalRecordCount") or 0),
            completed=int(j.get("successRecordCount") or 0),
            failed=int(j.get("errorRecordCount") or 0),
            errors=errors,
            created_at=int(j["submitTime"].timestamp()),
            input_file_id=input_uri,
        )

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        j = await self._call("polling a job", lambda: self._bedrock.get_model_invocation_job(jobIdentifier=batch_id))
        return self._remote(j)

    async def download(self, file_id: str, dest: Path) -> None:
        bucket, key = split_s3_uri(file_id)
        created = int(time.time())
        model = self._models.get(file_id) or "bedrock"
        tmp = dest.with_name(dest.name + ".part")

        def fetch() -> None:
            body = self._s3.get_object(Bucket=bucket, Key=key)["Body"]  # gone: a ProviderError with status 404
            with open(tmp, "wb") as out:
                for line in body.iter_lines():
                    if line.strip():
                        out.write(orjson.dumps(openai_line(orjson.loads(line), model, created)) + b"\n")

        await self._call(f"downloading {file_id}", fetch)
        os.replace(tmp, dest)

    async def cancel(self, batch_id: str) -> RemoteBatch:
        await self._call("stopping a job", lambda: self._bedrock.stop_model_invocation_job(jobIdentifier=batch_id))
        return await self.get_batch(batch_id)

    async def delete_file(self, file_id: str) -> None:
        bucket, key = split_s3_uri(file_id)
        await self._call(f"deleting {file_id}", lambda: self._s3.delete_object(Bucket=bucket, Key=key))

    # -- the direct API --------------------------------------------------------------------

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        """One InvokeModel call with the body a batch record would carry."""
        model = str(body.get("model") or "")
        if endpoint not in self.endpoints:
            return 404, {"error": {"message": f"{endpoint} is not translated", "type": "not_found_error"}}
        try:
            request = model_input(model, body)
        except Untranslatable as exc:
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}}

        def invoke() -> tuple[dict[str, Any], dict[str, str]]:
            answer = self._runtime.invoke_model(
                modelId=model, body=orjson.dumps(request), contentType="application/json", accept="application/json"
            )
            return orjson.loads(answer["body"].read()), answer["ResponseMetadata"].get("HTTPHeaders", {})

        try:
            output, headers = await self._call(f"InvokeModel {model}", invoke)
        except ProviderError as exc:
            if exc.status is None:  # not an HTTP answer (AWS could not be reached)
                return 502, {"error": {"message": str(exc), "type": "connection_error", "param": None, "code": None}}
            err = (exc.body or {}).get("Error", {}) if isinstance(exc.body, dict) else {}
            message = err.get("Message") or str(exc)
            return exc.status, {"error": {"message": message, "type": error_type(exc.status),
                                          "param": None, "code": err.get("Code")}}  # fmt: skip
        # Mistral's answer has no token counts; InvokeModel's headers do, for every model.
        counted = headers.get("x-amzn-bedrock-input-token-count"), headers.get("x-amzn-bedrock-output-token-count")
        tokens = (int(counted[0]), int(counted[1])) if all(c and c.isdigit() for c in counted) else None  # type: ignore[union-attr]
        try:
            return 200, completion_of(output, model, int(time.time()), tokens=tokens)
        except ValueError as exc:
            return 502, {"error": {"message": f"unexpected answer from Bedrock: {exc}", "type": "api_error"}}
