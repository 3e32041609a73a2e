"""Vertex AI batch prediction for Gemini, through google-genai's Vertex mode and google-cloud-storage
(`pip install "llmbatch[vertex]"`).

A batch is a `batchPredictionJob`: its input is a JSONL object in Cloud Storage of
`{"key": custom_id, "request": GenerateContentRequest}` lines (the Gemini provider's
translation, `_gemini_translate`); Vertex writes `predictions.jsonl` files into a folder it
makes under the job's output prefix (`outputInfo.gcsOutputDirectory`), one line per request
in no promised order: `{"status": "", "processed_time", "request", "response"}`, or a
non-empty `status` holding the error of a request that failed. Each result is matched by the
`key` of its input line, which Vertex is expected to pass through (extra fields of an input
line come back with its output line); a line that comes back without one is matched by its
echoed `request` against the chunk's input (read back from Cloud Storage), and one that matches
no request goes to the runner without an id (its row is sent again, its usage counted).

Where things go (`--gcs-uri gs://bucket/prefix`, or LLMBATCH_VERTEX_GCS_URI): a chunk's input
is `<prefix>/<tag>/input.jsonl`, with its model in the object's metadata (the runner hands
`create_batch` only the upload's id); its job writes under `<prefix>/<tag>/output/`. Collected
chunks' inputs are deleted (unless --keep-uploads); outputs stay, as the provider's record.

Project and location come from the usual Google environment: GOOGLE_CLOUD_PROJECT (else the
credentials' project) and GOOGLE_CLOUD_LOCATION (else GOOGLE_CLOUD_REGION, else us-central1);
credentials from Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
login, the metadata server). `--base-url` points both Vertex and Cloud Storage elsewhere.

Exactly once: a job's display name is the chunk's tag and its labels carry the tag and the job
(`llmbatch_chunk`, `llmbatch_job`), so after a crash `find_batch` lists jobs by label. States:
JOB_STATE_QUEUED/PENDING validating; RUNNING (PAUSED, UPDATING) in progress; SUCCEEDED and
PARTIALLY_SUCCEEDED completed; FAILED failed; CANCELLING/CANCELLED; EXPIRED expired. A job
that ends early has written the rows it finished; the runner sends the others again.

The adapter is the Gemini one (`GeminiBatchProvider`) for everything but batches and files:
the same SDK, request checks, error translation and direct API (`generateContent` on Vertex).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import google.api_core.exceptions as gexc
import google.auth
import google.auth.exceptions
import orjson
import requests
from google import genai
from google.cloud import storage
from google.genai import types

from .._exceptions import ConfigError, ProviderError
from . import _chat
from . import _gemini_translate as gt
from ._base import JOB_KEY, TAG_KEY, ProviderLimits, RemoteBatch, RemoteStatus
from ._gemini import GeminiBatchProvider, remote_status

__all__ = ["GCS_URI_ENV", "VERTEX_LIMITS", "VertexBatchProvider", "label_value", "split_gcs_uri", "translate_line"]

log = logging.getLogger("llmbatch.providers.vertex")
T = TypeVar("T")

GCS_URI_ENV = "LLMBATCH_VERTEX_GCS_URI"
DEFAULT_LOCATION = "us-central1"
#: Vertex's limits for a Gemini batch job: 200,000 requests and a 1 GB input file; 8 jobs of a
#: project run at once (more wait in the queue, which jobs leave after 72 hours, expired).
VERTEX_LIMITS = ProviderLimits(max_requests=200_000, max_bytes=1_000_000_000, max_in_flight=8)
_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
_MODEL_META = "llmbatch-model"
_STATUS_CODE = re.compile(r"\b([45]\d\d)\b")
_CODE_NAME = re.compile(r"\b[A-Z][A-Z_]{3,}\b")


def split_gcs_uri(uri: str, what: str = "--gcs-uri") -> tuple[str, str]:
    """(bucket, object prefix without slashes at its ends) of `gs://bucket/prefix`."""
    if not uri.startswith("gs://") or not uri[5:].split("/", 1)[0]:
        raise ConfigError(f"{what} must look like gs://bucket/prefix, not {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def label_value(value: str) -> str:
    """`value` as a Vertex label value: lower-case letters, digits, `_` and `-`, at most 63."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


def input_line(custom_id: str, body: dict[str, Any]) -> bytes:
    """The Vertex batch input line of a chat row (checked by `check_request`)."""
    return orjson.dumps({"key": custom_id, "request": gt.chat_request(body)})


def _canonical(request: Any) -> bytes:
    return orjson.dumps(request, option=orjson.OPT_SORT_KEYS)


def _http_status(text: str) -> int:
    """The HTTP status of a failed request's `status` text: a gRPC code name or an HTTP code in
    it; else 500, so that the row is tried again rather than failed for good."""
    for name in _CODE_NAME.findall(text):
        status = gt.http_status_of({"status": name})
        if status != 500 or name in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
            return status
    code = _STATUS_CODE.search(text)
    return int(code.group(1)) if code else 500


def translate_line(key: str, rec: dict[str, Any], *, model: str, created: int) -> dict[str, Any]:
    """The OpenAI batch output line for one Vertex output line (its echoed request left out)."""
    native = {k: v for k, v in rec.items() if k != "request"}
    status = rec.get("status")
    response = rec.get("response")
    if status or not isinstance(response, dict):
        text = str(status or "Vertex returned neither a response nor a status")
        return _chat.error_result(key, _http_status(text), text, type="vertex_error", native=native)
    body = gt.completion_body(response, custom_id=key, model=model, created=created)
    return _chat.result_line(key, 200, body, request_id=response.get("responseId"), native=native)


class VertexBatchProvider(GeminiBatchProvider):
    """Vertex AI batch prediction jobs for Gemini chat completions, files in Cloud Storage."""

    name = "vertex"
    key_env = None
    alt_key_env = None
    base_url_env = None
    endpoints = frozenset({gt.CHAT})
    custom_id_pattern = None
    unkeyed_results_in_order = False

    def __init__(  # noqa: PLR0913 -- keyword options, as every adapter's
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        limits: ProviderLimits | None = None,
        gcs_uri: str | None = None,
        project: str | None = None,
        location: str | None = None,
        credentials: Any = None,
        page_size: int = 100,
        timeout: float = 600.0,
    ) -> None:
        if api_key:
            raise ConfigError(
                "the vertex provider takes Google credentials (Application Default Credentials), not --api-key"
            )
        uri = gcs_uri or os.environ.get(GCS_URI_ENV)
        if not uri:
            raise ConfigError(
                f"the vertex provider needs a Cloud Storage location for its files: --gcs-uri or {GCS_URI_ENV}"
            )
        self.bucket, self.prefix = split_gcs_uri(uri)
        if credentials is None:
            try:
                credentials, adc_project = google.auth.default(scopes=_SCOPES)  # type: ignore[no-untyped-call]
            except google.auth.exceptions.DefaultCredentialsError as exc:
                raise ConfigError(
                    "the vertex provider found no Google credentials: run `gcloud auth application-default login` "
                    "or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file"
                ) from exc
            project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or adc_project
        self.project = project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if not self.project:
            raise ConfigError("the vertex provider needs a Google Cloud project: set GOOGLE_CLOUD_PROJECT")
        self.location = (
            location
            or os.environ.get("GOOGLE_CLOUD_LOCATION")
            or os.environ.get("GOOGLE_CLOUD_REGION")
            or DEFAULT_LOCATION
        )
        self.base_url = base_url
        self.limits = limits or VERTEX_LIMITS
        self.page_size = page_size
        # Inline batches are a Gemini API feature: every Vertex chunk goes through Cloud Storage.
        self.inline_max_bytes = self.inline_max_requests = 0
        self._finished = {}
        # v1: the GA batchPredictionJobs API (the SDK's default is v1beta1).
        options = types.HttpOptions(base_url=base_url, api_version="v1", timeout=int(timeout * 1000))
        self._client = genai.Client(
            vertexai=True, project=self.project, location=self.location, credentials=credentials, http_options=options
        )
        self._aio = self._client.aio
        client_options = {"api_endpoint": base_url} if base_url else None
        self._gcs = storage.Client(project=self.project, credentials=credentials, client_options=client_options)
        self._gcs_bucket = self._gcs.bucket(self.bucket)

    @classmethod
    def check_and_measure(cls, custom_id: str, endpoint: str, body: dict[str, Any]) -> tuple[list[str], int | None]:
        """The input line `upload` writes, and its newline."""
        reasons = cls.check_request(endpoint, body)
        if reasons:
            return reasons, None
        return [], len(input_line(custom_id, body)) + 1

    async def aclose(self) -> None:
        await super().aclose()
        self._gcs.close()

    async def _gcs_call(self, what: str, fn: Callable[[], T]) -> T:
        """Runs a Cloud Storage call in a thread (the client is synchronous), translating its errors here."""
        try:
            return await asyncio.to_thread(fn)
        except gexc.GoogleAPICallError as exc:
            status = int(exc.code) if exc.code is not None else 500
            raise ProviderError(f"{what} failed: HTTP {status}: {exc.message}", status=status) from exc
        except (google.auth.exceptions.GoogleAuthError, requests.RequestException, OSError) as exc:
            raise ProviderError(f"{what} failed: {exc!r}") from exc

    # -- uploads ---------------------------------------------------------------------------

    def _key(self, tag: str, name: str) -> str:
        return f"{self.prefix}/{tag}/{name}" if self.prefix else f"{tag}/{name}"

    def _uri(self, key: str) -> str:
        return f"gs://{self.bucket}/{key}"

    async def upload(self, tag: str, path: Path) -> str:
        translated = path.with_name(f"{tag}.vertex.jsonl")
        model = await asyncio.to_thread(_translate_chunk, path, translated)
        key = self._key(tag, "input.jsonl")
        blob = self._gcs_bucket.blob(key)
        blob.metadata = {_MODEL_META: model}
        try:
            await self._gcs_call(
                f"uploading chunk {tag} to {self._uri(key)}",
                lambda: blob.upload_from_filename(str(translated), content_type="application/jsonl"),
            )
        finally:
            translated.unlink(missing_ok=True)
        return self._uri(key)

    async def find_upload(self, tag: str, since: int) -> str | None:
        key = self._key(tag, "input.jsonl")
        blobs = await self._gcs_call("listing uploads", lambda: list(self._gcs.list_blobs(self.bucket, prefix=key)))
        for blob in blobs:
            created = blob.time_created.timestamp() if blob.time_created else None
            if blob.name == key and (created is None or created >= since - 60):  # a minute of clock skew
                return self._uri(key)
        return None

    async def delete_file(self, file_id: str) -> None:
        bucket, key = split_gcs_uri(file_id, "an upload id")

        def delete() -> None:
            try:
                self._gcs.bucket(bucket).blob(key).delete()
            except gexc.NotFound:
                pass  # deleted already

        await self._gcs_call(f"deleting {file_id}", delete)

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        if endpoint not in self.endpoints:
            raise ConfigError(f"the {self.name} provider cannot batch {endpoint}")
        if completion_window != "24h":
            raise ProviderError(
                f"Vertex batch jobs have no window to set (they run up to 24h after up to 72h queued), "
                f"not {completion_window}: drop --completion-window",
                status=400,
            )
        bucket, key = split_gcs_uri(file_id, "an upload id")
        blob = self._gcs.bucket(bucket).blob(key)
        await self._gcs_call(f"reading {file_id}", blob.reload)
        model = (blob.metadata or {}).get(_MODEL_META)
        if not model:
            raise ProviderError(f"chunk {tag}: its upload {file_id} names no model", status=400)
        config = types.CreateBatchJobConfig(
            display_name=tag,
            dest=self._uri(self._key(tag, "output")),
            # The SDK has no field for labels: they go into the body it sends.
            http_options=types.HttpOptions(
                extra_body={"labels": {TAG_KEY: label_value(tag), JOB_KEY: label_value(job)}}
            ),
        )
        created = await self._call(
            "creating a batch job", lambda: self._aio.batches.create(model=model, src=file_id, config=config)
        )
        return self._remote(created)

    async def _list(self, label: str, value: str) -> list[types.BatchJob]:
        config = {"page_size": self.page_size, "filter": f'labels.{label}="{label_value(value)}"'}

        async def scan() -> list[types.BatchJob]:
            return [b async for b in await self._aio.batches.list(config=config)]

        return await self._call("listing batch jobs", scan)

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        found = [
            b
            for b in await self._list(TAG_KEY, tag)
            if b.display_name == tag and (b.create_time is None or b.create_time.timestamp() >= since - 60)
        ]
        if not found:
            return None
        # Only a crash between two creates makes a second job for one chunk; the first one counts.
        found.sort(key=lambda b: b.create_time.timestamp() if b.create_time else 0.0)
        return self._remote(found[0])

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        found = []
        for b in await self._list(JOB_KEY, job_id):
            created = b.create_time.timestamp() if b.create_time else None
            if (b.display_name or "").startswith(f"{job_id}-c") and (created is None or created >= since - 60):
                remote = self._remote(b)
                remote.metadata[TAG_KEY] = b.display_name or ""
                found.append(remote)
        return found

    def _remote(self, b: types.BatchJob) -> RemoteBatch:
        assert b.name is not None
        status = remote_status(b.state.value if b.state is not None else None)
        model = (b.model or "").rsplit("/", 1)[-1]
        inputs = b.src.gcs_uri if b.src is not None and b.src.gcs_uri else []
        folder = b.output_info.gcs_output_directory if b.output_info is not None else None
        output = f"{model}|{folder}|{inputs[0] if inputs else ''}" if status.terminal and folder else None
        stats = b.completion_stats
        done, failed = (stats.successful_count or 0, stats.failed_count or 0) if stats else (0, 0)
        incomplete = (stats.incomplete_count or 0) if stats else 0
        errors = []
        if status is RemoteStatus.FAILED:
            message = (b.error.message if b.error is not None else None) or "the batch job failed"
            errors = [{"code": "job_failed", "message": message}]
        return RemoteBatch(
            id=b.name,
            status=status,
            output_file_id=output,
            total=done + failed + incomplete,
            completed=done,
            failed=failed,
            errors=errors,
            metadata={"display_name": b.display_name or ""},
            created_at=int(b.create_time.timestamp()) if b.create_time else int(time.time()),
            input_file_id=inputs[0] if inputs else None,
            # Vertex fills completionStats as instances finish; a job that shows none yet says nothing
            counts_live=stats is not None,
        )

    # -- results ---------------------------------------------------------------------------

    async def download(self, file_id: str, dest: Path) -> None:
        model, folder, input_uri = file_id.split("|", 2)
        bucket, prefix = split_gcs_uri(folder, "an output folder")
        blobs = await self._gcs_call(
            f"listing {folder}", lambda: list(self._gcs.list_blobs(bucket, prefix=prefix.rstrip("/") + "/"))
        )
        # Vertex writes predictions.jsonl (in parts, for large jobs: predictions_00001.jsonl, ...).
        parts = sorted(b.name for b in blobs if b.name.rsplit("/", 1)[-1].startswith("predictions"))
        raws: list[Path] = []
        try:
            for i, name in enumerate(parts):
                raw = dest.with_name(f"{dest.name}.vertex{i}")
                raws.append(raw)
                blob = self._gcs.bucket(bucket).blob(name)
                fetch = functools.partial(blob.download_to_filename, str(raw))
                await self._gcs_call(f"downloading gs://{bucket}/{name}", fetch)
            tmp = dest.with_name(dest.name + ".part")
            unkeyed = await asyncio.to_thread(_write_results, raws, tmp, model, int(time.time()))
            if unkeyed:
                inputs = await self._read_requests(input_uri)
                await asyncio.to_thread(_match_by_request, tmp, unkeyed, inputs)
            os.replace(tmp, dest)
        finally:
            for raw in raws:
                raw.unlink(missing_ok=True)

    async def _read_requests(self, input_uri: str) -> dict[bytes, deque[str]]:
        """The keys of a chunk's input by request, for results that came back without their key."""
        if not input_uri:
            return {}
        bucket, key = split_gcs_uri(input_uri, "an upload id")
        data = await self._gcs_call(
            f"reading {input_uri}", lambda: self._gcs.bucket(bucket).blob(key).download_as_bytes()
        )
        keys: dict[bytes, deque[str]] = defaultdict(deque)
        for line in data.splitlines():
            if line.strip():
                rec = orjson.loads(line)
                keys[_canonical(rec.get("request"))].append(rec["key"])
        return keys


# -- file work, run off the event loop -----------------------------------------------------------


def _translate_chunk(src: Path, dst: Path) -> str:
    """Writes a chunk's OpenAI lines as Vertex batch input lines; returns the chunk's model."""
    model = ""
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as lines, open(tmp, "wb") as out:
        for line in lines:
            if line.strip():
                rec = orjson.loads(line)
                model = model or rec["body"]["model"]
                out.write(input_line(rec["custom_id"], rec["body"]) + b"\n")
    os.replace(tmp, dst)
    return model


def _lines(paths: Iterable[Path]) -> Iterable[dict[str, Any]]:
    for path in paths:
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield orjson.loads(line)


def _write_results(raws: list[Path], dest: Path, model: str, created: int) -> dict[int, bytes]:
    """Writes OpenAI output lines; returns, for lines whose key did not come back, their line
    number and echoed request (written with `custom_id: null` for now)."""
    unkeyed: dict[int, bytes] = {}
    with open(dest, "wb") as out:
        for n, rec in enumerate(_lines(raws)):
            key = rec.get("key")
            if not isinstance(key, str) or not key:
                unkeyed[n] = _canonical(rec.get("request"))
                line = translate_line(f"#{n}", rec, model=model, created=created)
                out.write(orjson.dumps({**line, "custom_id": None}) + b"\n")
            else:
                out.write(orjson.dumps(translate_line(key, rec, model=model, created=created)) + b"\n")
    return unkeyed


def _match_by_request(path: Path, unkeyed: dict[int, bytes], inputs: dict[bytes, deque[str]]) -> None:
    """Gives each line without a key the key of an input line with the same request (identical
    requests share their keys out in turn); a line that matches none stays without an id."""
    tmp = path.with_name(path.name + ".matched")
    lost = 0
    with open(path, "rb") as src, open(tmp, "wb") as out:
        for n, line in enumerate(src):
            request = unkeyed.get(n)
            if request is not None:
                keys = inputs.get(request)
                if keys:
                    rec = orjson.loads(line)
                    rec["custom_id"] = keys.popleft()
                    line = orjson.dumps(rec) + b"\n"
                else:
                    lost += 1
            out.write(line)
    os.replace(tmp, path)
    if lost:
        log.warning("%s: %d results matched no request of the chunk; their rows go again", path.name, lost)
