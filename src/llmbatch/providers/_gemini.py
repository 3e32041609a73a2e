"""Google's Gemini API batch mode (the Developer API, not Vertex AI), through the `google-genai` SDK.

A chunk is translated once, in `upload`, into Gemini's batch input lines
(`{"key": custom_id, "request": GenerateContentRequest}`). A small chunk stays on disk and
its requests go inline with `batches.create` (each carrying `metadata.key`); a large one, and
every embeddings chunk, is uploaded with the Files API. Results are matched to rows by key:
Gemini has been seen to return inline results out of order (python-genai #1909, batches of
10,000+). Inline results have also been seen without their key (python-genai #1886, #2008):
those are written in the order they came, without a custom_id, for the runner to match by
position (`Provider.unkeyed_results_in_order`: Google documents inline responses "in the same
order as the input requests"), and from then on only chunks of at most
`INLINE_UNKEYED_MAX_REQUESTS` go inline, so that less rides on that order.

Tagging: a batch's display name is the chunk's tag, so `find_batch` lists batches and matches
it; an uploaded file's display name is `TAG|MODEL`, because `create_batch` needs the model
and the runner hands it only the upload's id. Upload ids are `MODEL|files/NAME` or
`MODEL|local:PATH`; result ids `MODEL|files/NAME` (a responses file) or `MODEL|batches/NAME`
(inline responses). Gemini returns nothing for the requests of an expired batch (it ends
after 48 hours without results), so the runner sends those rows again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
import orjson
import pydantic
from google import genai
from google.genai import batches as genai_batches
from google.genai import errors as genai_errors
from google.genai import types

from .._exceptions import ConfigError, ProviderError
from . import _chat
from . import _gemini_translate as gt
from ._base import TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus

__all__ = ["GeminiBatchProvider", "GEMINI_LIMITS", "INLINE_MAX_BYTES", "INLINE_UNKEYED_MAX_REQUESTS"]

log = logging.getLogger("llmbatch.providers.gemini")
T = TypeVar("T")

#: Connection failures of every HTTP client the SDK may use: httpx2 (its default backend), httpx
#: (the fallback), and aiohttp, which its async calls use wherever aiohttp is installed (llmbatch
#: depends on it): a server hanging up is aiohttp's ServerDisconnectedError, not an OSError.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError, aiohttp.ClientError, OSError)
try:
    import httpx2

    _TRANSPORT_ERRORS += (httpx2.TransportError,)
except ImportError:  # pragma: no cover
    pass

#: Gemini batch mode limits (shared/reference/provider-batch-apis.md section 4, and the rate-limit
#: docs: 100 concurrent batches, 2 GB input files). No per-batch request cap is published:
#: 50,000 keeps a chunk's results (held by the SDK as one object for inline batches) moderate,
#: and 1 GiB of OpenAI lines leaves room for the translation to grow under the 2 GB file cap.
GEMINI_LIMITS = ProviderLimits(max_requests=50_000, max_bytes=1 << 30, max_in_flight=100)
#: Chunks whose translated requests are at most this large go inline; Google's limit for an
#: inline batch is 20 MB for the whole create call, so this leaves room for the envelope.
INLINE_MAX_BYTES = 16 << 20
#: ... and that hold at most this many requests: the SDK turns inline results into its own
#: types (about half a millisecond each, on the event loop), while a results file is streamed.
INLINE_MAX_REQUESTS = 1000
#: ... and, once inline results have come back without their keys, at most this many: larger
#: chunks go by file, whose result lines always carry their key.
INLINE_UNKEYED_MAX_REQUESTS = 100
#: Environment variable that overrides `inline_max_bytes` (0: always upload a file).
INLINE_ENV = "LLMBATCH_GEMINI_INLINE_MAX_BYTES"

_STATUS = {
    "UNSPECIFIED": RemoteStatus.VALIDATING,
    "QUEUED": RemoteStatus.VALIDATING,
    "PENDING": RemoteStatus.VALIDATING,
    "RUNNING": RemoteStatus.IN_PROGRESS,
    "PAUSED": RemoteStatus.IN_PROGRESS,
    "UPDATING": RemoteStatus.IN_PROGRESS,
    "SUCCEEDED": RemoteStatus.COMPLETED,
    "PARTIALLY_SUCCEEDED": RemoteStatus.COMPLETED,
    "FAILED": RemoteStatus.FAILED,
    "CANCELLING": RemoteStatus.CANCELLING,
    "CANCELLED": RemoteStatus.CANCELLED,
    "EXPIRED": RemoteStatus.EXPIRED,
}


def remote_status(state: str | None) -> RemoteStatus:
    """One `RemoteStatus` for a Gemini state, wire (`BATCH_STATE_*`) or SDK (`JOB_STATE_*`) spelling."""
    name = (state or "UNSPECIFIED").removeprefix("JOB_STATE_").removeprefix("BATCH_STATE_")
    status = _STATUS.get(name)
    if status is None:
        log.warning("unknown Gemini batch state %r: treating it as running", state)
        return RemoteStatus.IN_PROGRESS
    return status


def _timestamp(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _dump(model: pydantic.BaseModel) -> dict[str, Any]:
    """An SDK object as the API's own JSON (camelCase), without the SDK's additions."""
    data: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    for extra in ("sdkHttpResponse", "automaticFunctionCallingHistory", "parsed"):
        data.pop(extra, None)
    return data


def _sdk_config(request: dict[str, Any]) -> types.GenerateContentConfig | None:
    """The SDK's config for a REST request: generationConfig plus the request-level settings."""
    config = dict(request.get("generationConfig") or {})
    for key in ("systemInstruction", "tools", "toolConfig"):
        if key in request:
            config[key] = request[key]
    return types.GenerateContentConfig.model_validate_json(orjson.dumps(config)) if config else None


@functools.cache
def _contents_adapter() -> pydantic.TypeAdapter[list[types.Content]]:
    return pydantic.TypeAdapter(list[types.Content])


def _sdk_contents(contents: list[dict[str, Any]]) -> list[types.Content]:
    # From JSON, so that base64 strings (inline data, thought signatures) become the SDK's bytes.
    return _contents_adapter().validate_json(orjson.dumps(contents))


@functools.cache
def _stand_in() -> list[types.InlinedRequest]:
    """The request list `batches.create` is given for an inline batch; `extra_body` replaces it."""
    return [types.InlinedRequest(contents=[types.Content(role="user", parts=[types.Part(text="-")])])]


class GeminiBatchProvider(Provider):
    """Gemini API batch mode: chat completions and embeddings, translated both ways."""

    name = "gemini"
    key_env = "GEMINI_API_KEY"
    #: Also read for the key when GEMINI_API_KEY is unset.
    alt_key_env = "GOOGLE_API_KEY"
    #: The SDK's own variable for the Gemini API's base URL.
    base_url_env = "GOOGLE_GEMINI_BASE_URL"
    endpoints = frozenset({gt.CHAT, gt.EMBEDDINGS})
    # An embedding key is "CUSTOM_ID#I/N": ids with a "#" go under a runner-made id.
    custom_id_pattern = re.compile(r"[^#]+")
    unkeyed_results_in_order = True

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        api_version: str | None = None,
        limits: ProviderLimits | None = None,
        inline_max_bytes: int | None = None,
        inline_max_requests: int = INLINE_MAX_REQUESTS,
        page_size: int = 50,
        timeout: float = 600.0,
    ) -> None:
        key = self.api_key_from(api_key)
        self.base_url = self.base_url_from(base_url)
        self.limits = limits or GEMINI_LIMITS
        if inline_max_bytes is None:
            env = os.environ.get(INLINE_ENV)
            try:
                inline_max_bytes = int(env) if env else INLINE_MAX_BYTES
            except ValueError as exc:
                raise ConfigError(f"{INLINE_ENV} must be a number of bytes, not {env!r}") from exc
        self.inline_max_bytes = inline_max_bytes
        self.inline_max_requests = inline_max_requests
        self.page_size = page_size
        # The batch endpoints are documented on v1beta; --api-version picks another.
        options = types.HttpOptions(
            base_url=self.base_url, api_version=api_version or "v1beta", timeout=int(timeout * 1000)
        )
        self._client = genai.Client(vertexai=False, api_key=key, http_options=options)
        self._aio = self._client.aio
        #: Finished inline batches from `get_batch`, kept for the `download` that follows.
        self._finished: dict[str, types.BatchJob] = {}

    @classmethod
    def check_request(cls, endpoint: str, body: dict[str, Any]) -> list[str]:
        reasons = super().check_request(endpoint, body)
        if reasons:
            return reasons
        return gt.check_embeddings(body) if endpoint == gt.EMBEDDINGS else gt.check_chat(body)

    async def aclose(self) -> None:
        await self._aio.aclose()
        self._client.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Runs an SDK call, translating its errors once, here at the boundary."""
        try:
            return await fn()
        except genai_errors.APIError as exc:
            raise ProviderError(
                f"{what} failed: HTTP {exc.code}: {exc.message or exc.status}", status=exc.code, body=exc.details
            ) from exc
        except _TRANSPORT_ERRORS as exc:
            where = self.base_url or "generativelanguage.googleapis.com"
            raise ProviderError(f"{what} failed: cannot reach {where}: {exc!r}") from exc
        except (pydantic.ValidationError, KeyError, ValueError) as exc:
            # An answer the SDK could not read (or a resumable upload that did not finalize).
            raise ProviderError(f"{what} failed: unexpected answer from the Gemini API: {exc}") from exc

    # -- uploads ---------------------------------------------------------------------------

    async def upload(self, tag: str, path: Path) -> str:
        translated = path.with_name(f"{path.name.removesuffix('.jsonl')}.gemini.jsonl")
        endpoint, model, count = await asyncio.to_thread(_translate_chunk, path, translated)
        small = translated.stat().st_size <= self.inline_max_bytes and count <= self.inline_max_requests
        if endpoint == gt.CHAT and small:
            return f"{model}|local:{translated}"
        config = types.UploadFileConfig(display_name=f"{tag}|{model}", mime_type="jsonl")
        f = await self._call("uploading requests", lambda: self._aio.files.upload(file=translated, config=config))
        translated.unlink(missing_ok=True)
        return f"{model}|{f.name}"

    async def find_upload(self, tag: str, since: int) -> str | None:
        async def scan() -> str | None:
            async for f in await self._aio.files.list(config={"page_size": 100}):
                file_tag, _, model = (f.display_name or "").partition("|")
                created = _timestamp(f.create_time)
                if file_tag == tag and model and (created is None or created >= since):
                    return f"{model}|{f.name}"
            return None

        return await self._call("listing files", scan)

    async def delete_file(self, file_id: str) -> None:
        _model, _, ref = file_id.partition("|")
        if ref.startswith("local:"):
            Path(ref.removeprefix("local:")).unlink(missing_ok=True)
        elif ref.startswith("files/"):
            await self._call("deleting a file", lambda: self._aio.files.delete(name=ref))

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        if completion_window != "24h":
            raise ProviderError(
                f"Gemini batches have a fixed window (24h target, expiry at 48h), not {completion_window}: "
                "drop --completion-window",
                status=400,
            )
        model, _, ref = file_id.partition("|")
        config = types.CreateBatchJobConfig(display_name=tag)
        if ref.startswith("local:"):
            path = Path(ref.removeprefix("local:"))
            if not path.exists():
                # Deleted only once a batch was created from it: that batch exists, even if the
                # listing does not show it yet. Retryable, so the runner looks for it again.
                raise ProviderError(f"chunk {tag}: its batch was already created; waiting for Gemini to list it")
            # The requests are in the API's own shape already: they go in `extra_body`, which
            # replaces the SDK's request list (here a stand-in) in the body it sends. Taking them
            # through the SDK's types instead costs about 2 ms a request, on the event loop.
            requests = await asyncio.to_thread(_inline_requests, path)
            body = {"batch": {"inputConfig": {"requests": {"requests": requests}}}}
            config.http_options = types.HttpOptions(extra_body=body)
            created = await self._call(
                "creating a batch", lambda: self._aio.batches.create(model=model, src=_stand_in(), config=config)
            )
            path.unlink(missing_ok=True)
        elif endpoint == gt.EMBEDDINGS:
            src_e = types.EmbeddingsBatchJobSource(file_name=ref)
            config_e = types.CreateEmbeddingsBatchJobConfig(display_name=tag)
            with warnings.catch_warnings():  # the SDK calls batch embeddings experimental, on every call
                warnings.filterwarnings("ignore", message=r"batches\.create_embeddings\(\) is experimental")
                created = await self._call(
                    "creating a batch",
                    lambda: self._aio.batches.create_embeddings(model=model, src=src_e, config=config_e),
                )
        else:
            created = await self._call(
                "creating a batch", lambda: self._aio.batches.create(model=model, src=ref, config=config)
            )
        return self._remote(created)

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        # Gemini's list order is not documented: every page is read before answering "none".
        async def scan() -> RemoteBatch | None:
            async for b in await self._aio.batches.list(config={"page_size": self.page_size}):
                created = _timestamp(b.create_time)
                if b.display_name == tag and (created is None or created >= since):
                    return self._remote(b)
            return None

        return await self._call("listing batches", scan)

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        # A batch's display name is its chunk's tag (`JOB-cNNNNN`). The list order is not
        # documented, so every page is read. Neither an uploaded file nor inline requests can be
        # read back: the audit learns a lost batch's rows from its results once it ends.
        prefix = f"{job_id}-c"

        async def scan() -> list[RemoteBatch]:
            found: list[RemoteBatch] = []
            async for b in await self._aio.batches.list(config={"page_size": self.page_size}):
                created = _timestamp(b.create_time)
                if (b.display_name or "").startswith(prefix) and (created is None or created >= since):
                    remote = self._remote(b)
                    remote.metadata[TAG_KEY] = b.display_name or ""
                    found.append(remote)
            return found

        return await self._call("listing batches", scan)

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        job, stats = await self._call("polling a batch", lambda: self._get_with_stats(batch_id))
        remote = self._remote(job)
        if stats and not remote.status.terminal:  # an ended batch's counts come from its results
            remote.total = _int(stats.get("requestCount"))
            remote.completed = _int(stats.get("successfulRequestCount"))
            remote.failed = _int(stats.get("failedRequestCount"))
            remote.counts_live = True
        return remote

    async def _get_with_stats(self, batch_id: str) -> tuple[types.BatchJob, dict[str, Any]]:
        """The batch and its `metadata.batchStats` (request counts that move while it runs),
        which the SDK's BatchJob leaves out: the same GET `batches.get` makes, read here first.
        An SDK without that internal call gives the batch without its counts."""
        api = getattr(self._aio, "_api_client", None)
        to_job = getattr(genai_batches, "_BatchJob_from_mldev", None)
        if api is None or to_job is None or getattr(api, "vertexai", False):
            return await self._aio.batches.get(name=batch_id), {}
        response = await api.async_request("get", batch_id, {}, None)
        raw = orjson.loads(response.body) if response.body else {}
        stats = (raw.get("metadata") or {}).get("batchStats") if isinstance(raw, dict) else None
        job = types.BatchJob._from_response(response=to_job(raw), kwargs={})
        return job, stats if isinstance(stats, dict) else {}

    async def cancel(self, batch_id: str) -> RemoteBatch:
        await self._call("cancelling a batch", lambda: self._aio.batches.cancel(name=batch_id))
        return await self.get_batch(batch_id)

    def _remote(self, b: types.BatchJob) -> RemoteBatch:
        assert b.name is not None
        status = remote_status(b.state.value if b.state is not None else None)
        model = (b.model or "").removeprefix("models/")
        output = None
        total = completed = failed = 0
        dest = b.dest
        if status.terminal and dest is not None:
            inline = _inline_results(dest)
            if dest.file_name:
                output = f"{model}|{dest.file_name}"
            elif inline:
                output = f"{model}|{b.name}"
                self._finished[b.name] = b
                total = len(inline)
                failed = sum(1 for r in inline if r.error is not None)
                completed = total - failed
        return RemoteBatch(
            id=b.name,
            status=status,
            output_file_id=output,
            total=total,
            completed=completed,
            failed=failed,
            metadata={"display_name": b.display_name or ""},
            created_at=_timestamp(b.create_time) or int(time.time()),
        )

    # -- results ---------------------------------------------------------------------------

    async def download(self, file_id: str, dest: Path) -> None:
        model, _, ref = file_id.partition("|")
        tmp = dest.with_name(dest.name + ".part")
        if ref.startswith("batches/"):
            job = self._finished.pop(ref, None) or await self._call(
                "fetching results", lambda: self._aio.batches.get(name=ref)
            )
            responses = _inline_results(job.dest) if job.dest else []
            created = _timestamp(job.end_time or job.update_time) or int(time.time())
            unkeyed = await asyncio.to_thread(_write_results, map(_dump, responses), tmp, model, created)
            if unkeyed:
                # Written in the order they came, for the runner to match by position (the
                # order Google documents); chunks larger than a few requests go by file from now on.
                log.warning(
                    "batch %s: %d of %d inline results came back without their key; they go to the runner "
                    "in the order they came, and chunks of more than %d requests go by file from now on",
                    ref,
                    unkeyed,
                    len(responses),
                    INLINE_UNKEYED_MAX_REQUESTS,
                )
                self.inline_max_requests = min(self.inline_max_requests, INLINE_UNKEYED_MAX_REQUESTS)
        else:
            raw = dest.with_name(dest.name + ".gemini")
            await self._call(f"downloading {ref}", lambda: self._aio.files.download(file=ref, destination=str(raw)))
            await asyncio.to_thread(_translate_results_file, raw, tmp, model, int(time.time()))
            raw.unlink(missing_ok=True)
        os.replace(tmp, dest)

    # -- the direct API --------------------------------------------------------------------

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        try:
            if endpoint == gt.EMBEDDINGS:
                texts = [r["content"]["parts"][0]["text"] for r in gt.embed_requests(body)]
                config = types.EmbedContentConfig(output_dimensionality=body.get("dimensions"))
                got = await self._aio.models.embed_content(model=body["model"], contents=texts, config=config)
                vectors = [list(e.values or []) for e in got.embeddings or []]
                return 200, gt.embedding_body(vectors, model=body["model"])
            request = gt.chat_request(body)
            contents = _sdk_contents(request["contents"])
            response = await self._aio.models.generate_content(
                model=body["model"], contents=contents, config=_sdk_config(request)
            )
        except genai_errors.APIError as exc:
            error = {"message": exc.message or str(exc), "type": (exc.status or "api_error").lower()}
            return exc.code, {"error": {**error, "param": None, "code": exc.status}}
        except _TRANSPORT_ERRORS as exc:
            return 502, {"error": {"message": f"cannot reach the Gemini API: {exc!r}", "type": "connection_error"}}
        except (pydantic.ValidationError, ValueError) as exc:  # an answer the SDK could not read
            return 502, {"error": {"message": f"unexpected answer from the Gemini API: {exc}", "type": "api_error"}}
        native = _dump(response)
        return 200, gt.completion_body(
            native, custom_id=uuid.uuid4().hex, model=body["model"], created=int(time.time())
        )


# -- file work, run off the event loop -----------------------------------------------------------


def _translate_chunk(src: Path, dst: Path) -> tuple[str, str, int]:
    """Writes a chunk's OpenAI lines as Gemini batch lines; returns (endpoint, model, requests)."""
    endpoint = model = ""
    count = 0
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as lines, open(tmp, "wb") as out:
        for line in lines:
            if not line.strip():
                continue
            rec = orjson.loads(line)
            endpoint, body, cid = rec["url"], rec["body"], rec["custom_id"]
            model = body["model"]
            if endpoint == gt.EMBEDDINGS:
                reqs = gt.embed_requests(body)
                for i, req in enumerate(reqs):
                    out.write(orjson.dumps({"key": gt.embedding_key(cid, i, len(reqs)), "request": req}) + b"\n")
                count += len(reqs)
            else:
                out.write(orjson.dumps({"key": cid, "request": gt.chat_request(body)}) + b"\n")
                count += 1
    os.replace(tmp, dst)
    return endpoint, model, count


def _inline_requests(path: Path) -> list[dict[str, Any]]:
    """A translated chunk's lines as inline requests (`metadata.key` carries the custom_id)."""
    with open(path, "rb") as fh:
        return [{"request": rec["request"], "metadata": {"key": rec["key"]}} for rec in map(orjson.loads, fh)]


def _count(value: Any) -> int:
    """A token count from Gemini's JSON: a number, or an int64 as a string; anything else is 0."""
    try:
        return max(int(value), 0) if value is not None and not isinstance(value, bool) else 0
    except (TypeError, ValueError):
        return 0


def _inline_results(dest: types.BatchJobDestination) -> list[Any]:
    """A finished batch's inline results: generate responses, or embed ones (which Gemini may
    also return inline for a batch whose requests came in a file)."""
    return list(dest.inlined_responses or dest.inlined_embed_content_responses or [])


def _key_of(item: dict[str, Any]) -> str | None:
    key = item.get("key")
    if key is None:
        key = (item.get("metadata") or {}).get("key")
    return key if isinstance(key, str) and key else None


def _write_results(items: Iterable[dict[str, Any]], dest: Path, model: str, created: int) -> int:
    """Writes OpenAI output lines for Gemini result items; returns how many had no key. A chat
    result without a key is written in its place with `"custom_id": null` (the runner matches
    such lines by position, or counts their usage as spent); an embedding without one is dropped."""
    unkeyed = 0
    embeddings = _EmbeddingGroups(model)
    with open(dest, "wb") as out:
        for item in items:
            key = _key_of(item)
            if key is None:
                unkeyed += 1
                response = item.get("response") or {}
                if "embedding" not in response and "embeddings" not in response:
                    line = gt.result_line(f"#{unkeyed}", item, model=model, created=created)
                    out.write(orjson.dumps({**line, "custom_id": None}) + b"\n")
                continue
            part = gt.parse_embedding_key(key)
            if part is not None:
                done = embeddings.add(*part, item)
                if done is not None:
                    out.write(orjson.dumps(done) + b"\n")
                continue
            out.write(orjson.dumps(gt.result_line(key, item, model=model, created=created)) + b"\n")
        for line in embeddings.rest():
            out.write(orjson.dumps(line) + b"\n")
    return unkeyed


def _translate_results_file(raw: Path, dest: Path, model: str, created: int) -> None:
    def items() -> Iterable[dict[str, Any]]:
        with open(raw, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield orjson.loads(line)

    unkeyed = _write_results(items(), dest, model, created)
    if unkeyed:
        log.warning("%s: %d result lines came without a key (passed on in the order they came)", raw.name, unkeyed)


class _EmbeddingGroups:
    """Collects the results of an embeddings row's inputs (one Gemini request each) into one line."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.groups: dict[str, dict[int, dict[str, Any]]] = {}
        self.counts: dict[str, int] = {}

    def add(self, cid: str, index: int, count: int, item: dict[str, Any]) -> dict[str, Any] | None:
        group = self.groups.setdefault(cid, {})
        group[index] = item
        self.counts[cid] = count
        if len(group) < count:
            return None
        del self.groups[cid]
        return self._line(cid, group, count)

    def rest(self) -> list[dict[str, Any]]:
        return [self._line(cid, group, self.counts[cid]) for cid, group in self.groups.items()]

    def _line(self, cid: str, group: dict[int, dict[str, Any]], count: int) -> dict[str, Any]:
        items = [group[i] for i in sorted(group)]
        errors = [item["error"] for item in items if item.get("error")]
        if errors:
            e = errors[0]
            status = gt.http_status_of(e)
            return _chat.error_result(cid, status, e.get("message") or "the request failed", native=items)
        if len(group) < count:
            message = f"Gemini returned {len(group)} of this row's {count} embeddings"
            return _chat.error_result(cid, 500, message, native=items)
        vectors, tokens = [], 0
        for item in items:
            response = item.get("response") or {}
            embedding = response.get("embedding") or (response.get("embeddings") or [{}])[0]
            vectors.append(list(embedding.get("values") or []))
            # An embed result carries `tokenCount`, an int64 (a string in REST JSON); generate-style
            # usage is the fallback.
            count = response.get("tokenCount") or (response.get("usageMetadata") or {}).get("promptTokenCount")
            tokens += _count(count)
        body = gt.embedding_body(vectors, model=self.model, prompt_tokens=tokens)
        return _chat.result_line(cid, 200, body, native=items)


def _int(value: Any) -> int:
    """An int64 that JSON carries as a string ("12"); 0 for anything else."""
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0
