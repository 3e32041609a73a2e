"""OpenAI's Batch API, and any server that speaks it (llmbatch's own, vLLM gateways, ...).

Uses the official `openai` SDK. A chunk's tag goes into the uploaded file's name and into
the batch's metadata, so that after a crash the runner can list and match instead of
creating a second upload or, worse, a second batch.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import openai
import orjson

from .._exceptions import ConfigError, ProviderError
from ._base import JOB_KEY, TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus

__all__ = ["AzureBatchProvider", "GroqBatchProvider", "OpenAIBatchProvider", "tagged_filename"]

T = TypeVar("T")

#: OpenAI's published limits (see shared/reference/provider-batch-apis.md, section 1).
OPENAI_LIMITS = ProviderLimits(max_requests=50_000, max_bytes=200 * 1024 * 1024, max_in_flight=20)


def tagged_filename(tag: str) -> str:
    """The upload filename that carries a chunk's tag."""
    return f"llmbatch-{tag}.jsonl"


def _remote(b: Any) -> RemoteBatch:
    counts = b.request_counts
    errors = [e.model_dump() for e in (b.errors.data or [])] if b.errors is not None else []
    return RemoteBatch(
        id=b.id,
        status=RemoteStatus(b.status),
        # Azure answers "" for no file: both mean none.
        output_file_id=b.output_file_id or None,
        error_file_id=b.error_file_id or None,
        total=counts.total if counts else 0,
        completed=counts.completed if counts else 0,
        failed=counts.failed if counts else 0,
        # request_counts move while the batch runs (an llmbatch server writes them every 0.25 s).
        counts_live=counts is not None,
        errors=errors,
        metadata=dict(b.metadata or {}),
        created_at=b.created_at,
        input_file_id=getattr(b, "input_file_id", None) or None,
    )


class OpenAIBatchProvider(Provider):
    """An OpenAI-compatible Batch API at `base_url` (default OpenAI's)."""

    name = "openai"
    #: Whether its batch listing comes newest first (OpenAI's does), so a scan may stop at `since`.
    lists_newest_first: ClassVar[bool] = True
    key_env = "OPENAI_API_KEY"
    #: The environment variable with the base URL, and the default when it is unset.
    base_url_env = "OPENAI_BASE_URL"
    default_base_url: str | None = None
    default_limits = OPENAI_LIMITS

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        limits: ProviderLimits | None = None,
        max_retries: int = 5,
        timeout: float = 600.0,
    ) -> None:
        key = self.api_key_from(api_key)
        self.base_url = self.base_url_from(base_url, self.default_base_url)
        self.limits = limits or self.default_limits
        self._client = self._make_client(key, max_retries, timeout)

    def _make_client(self, key: str, max_retries: int, timeout: float) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout)

    async def aclose(self) -> None:
        await self._client.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Runs an SDK call, translating its errors once, here at the boundary."""
        try:
            return await fn()
        except openai.APIStatusError as exc:
            raise ProviderError(
                f"{what} failed: HTTP {exc.status_code}: {exc.message}", status=exc.status_code, body=exc.body
            ) from exc
        except openai.APIConnectionError as exc:
            where = self.base_url or "api.openai.com"
            raise ProviderError(f"{what} failed: cannot reach {where}: {exc}") from exc

    @property
    def _once(self) -> openai.AsyncOpenAI:
        """The client without the SDK's automatic retries, for calls that create something.

        The SDK would repeat a create whose answer was lost (it sends no idempotency key),
        making a second batch. Instead the failure reaches the runner, which first looks the
        chunk up by its tag and creates only what it does not find.
        """
        return self._client.with_options(max_retries=0)

    async def upload(self, tag: str, path: Path) -> str:
        with open(path, "rb") as fh:
            f = await self._call(
                "upload", lambda: self._once.files.create(file=(tagged_filename(tag), fh), purpose="batch")
            )
        return f.id

    async def find_upload(self, tag: str, since: int) -> str | None:
        name = tagged_filename(tag)

        async def scan() -> str | None:
            async for f in self._client.files.list(purpose="batch", order="desc", limit=1000):
                if f.created_at < since:
                    return None  # newest first: nothing older can be ours
                if f.filename == name:
                    return f.id
            return None

        return await self._call("listing files", scan)

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        b = await self._call(
            "creating a batch",
            lambda: self._once.batches.create(
                input_file_id=file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=completion_window,  # type: ignore[arg-type]
                metadata={TAG_KEY: tag, JOB_KEY: job},
            ),
        )
        return _remote(b)

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        async def scan() -> RemoteBatch | None:
            async for b in self._client.batches.list(limit=100):
                if b.created_at < since:
                    return None  # newest first
                # The tag in the metadata; or, where a vendor drops metadata, the chunk's own upload.
                if (b.metadata or {}).get(TAG_KEY) == tag or (file_id and b.input_file_id == file_id):
                    return _remote(b)
            return None

        return await self._call("listing batches", scan)

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        async def scan() -> list[RemoteBatch]:
            found: list[RemoteBatch] = []
            # One listing per call: newest first where the API promises it (OpenAI), so it stops at
            # `since`; every page where a vendor may order it otherwise.
            async for b in _every_item(self._client.batches.list(limit=100)):
                if b.created_at < since:
                    if self.lists_newest_first:
                        break
                    continue
                if (b.metadata or {}).get(JOB_KEY) == job_id:
                    found.append(_remote(b))
            return found

        return await self._call("listing batches", scan)

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        return _remote(await self._call("polling a batch", lambda: self._client.batches.retrieve(batch_id)))

    async def download(self, file_id: str, dest: Path) -> None:
        async def fetch() -> None:
            tmp = dest.with_suffix(dest.suffix + ".part")
            async with self._client.files.with_streaming_response.content(file_id) as resp:
                with open(tmp, "wb") as out:
                    async for chunk in resp.iter_bytes(1 << 20):
                        out.write(chunk)
            os.replace(tmp, dest)

        await self._call(f"downloading {file_id}", fetch)

    async def cancel(self, batch_id: str) -> RemoteBatch:
        return _remote(await self._call("cancelling a batch", lambda: self._client.batches.cancel(batch_id)))

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        path = endpoint.removeprefix("/v1")
        try:
            return 200, await self._client.post(path, body=body, cast_to=object)
        except openai.APIStatusError as exc:
            return exc.status_code, {"error": exc.body}
        except openai.APIConnectionError as exc:
            return 502, {"error": {"message": f"cannot reach the direct API: {exc}", "type": "connection_error"}}

    async def delete_file(self, file_id: str) -> None:
        await self._call("deleting a file", lambda: self._client.files.delete(file_id))


#: Azure's code for a create refused because the deployment's enqueued-token quota is full.
AZURE_TOKEN_LIMIT_CODE = "token_limit_exceeded"
#: How long Azure keeps uploaded input files and batch output files (its minimum, 14 days).
#: Files that expire lift the resource's cap from 500 batch files to 10,000 (Azure's batch how-to).
AZURE_FILE_TTL_SECONDS = 14 * 24 * 3600
#: The first dated API version that takes `expires_after` / `output_expires_after`.
AZURE_EXPIRY_SINCE_VERSION = "2025-03-01"


async def _every_item(first_page: Awaitable[Any]) -> AsyncIterator[Any]:
    """Every item of an SDK listing, for vendors whose lists may not page like OpenAI's.

    Without `has_more` the SDK asks again with `after=<last id>`; a server that ignores
    `after` answers the same page again, and the SDK would loop forever. A page that
    brings no id not seen before ends the listing.
    """
    page = await first_page
    seen: set[str] = set()
    while True:
        fresh = [item for item in page.data if item.id not in seen]
        if not fresh:
            return
        for item in fresh:
            seen.add(item.id)
            yield item
        if not page.has_next_page():
            return
        page = await page.get_next_page()


class _VendorBatchProvider(OpenAIBatchProvider):
    """An OpenAI-compatible vendor (Azure, Groq) whose lists may not order or page like OpenAI's.

    Lookups after a crash scan the whole listing in whatever order it comes: a vendor may
    ignore `order`, and OpenAI's scan stops at the first item older than `since`, which is
    only right newest first.
    """

    lists_newest_first = False

    async def find_upload(self, tag: str, since: int) -> str | None:
        name = tagged_filename(tag)

        async def scan() -> str | None:
            async for f in _every_item(self._client.files.list(purpose="batch")):
                if f.filename == name and f.created_at >= since:
                    return str(f.id)
            return None

        return await self._call("listing files", scan)

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        async def scan() -> RemoteBatch | None:
            async for b in _every_item(self._client.batches.list(limit=100)):
                if b.created_at < since:
                    continue
                if (b.metadata or {}).get(TAG_KEY) == tag or (file_id and b.input_file_id == file_id):
                    return _remote(b)
            return None

        return await self._call("listing batches", scan)


class GroqBatchProvider(_VendorBatchProvider):
    """Groq's Batch API: OpenAI's line format for chat completions, windows from 24h to 7d, files up to 100 MB.

    Groq's chat API answers 400 to `logprobs`, `top_logprobs`, `logit_bias`, `messages[].name`
    and `n` other than 1 (its OpenAI-compatibility page): such rows are refused at ingest.
    """

    name = "groq"
    key_env = "GROQ_API_KEY"
    base_url_env = "GROQ_BASE_URL"
    default_base_url = "https://api.groq.com/openai/v1"
    default_limits = ProviderLimits(max_requests=50_000, max_bytes=100 * 1024 * 1024, max_in_flight=20)
    # Groq also batches audio transcription and translation, which llmbatch's rows do not carry.
    endpoints = frozenset({"/v1/chat/completions"})

    @classmethod
    def check_request(cls, endpoint: str, body: dict[str, Any]) -> list[str]:
        reasons = super().check_request(endpoint, body)
        if reasons:
            return reasons
        for key in ("logprobs", "top_logprobs", "logit_bias"):
            if body.get(key) is not None:
                reasons.append(f"groq does not support {key}: drop it")
        if body.get("n") not in (None, 1):
            reasons.append(f"groq returns one choice per request (n={body.get('n')!r}): drop n")
        messages = body.get("messages")
        if isinstance(messages, list) and any(isinstance(m, dict) and "name" in m for m in messages):
            reasons.append("groq does not support messages[].name: drop it")
        return reasons


#: Azure OpenAI Global Batch limits (shared/reference/provider-batch-apis.md, section 2).
AZURE_LIMITS = ProviderLimits(max_requests=100_000, max_bytes=200 * 1024 * 1024, max_in_flight=20)


class AzureBatchProvider(_VendorBatchProvider):
    """Azure OpenAI batch deployments.

    The endpoint comes from `--base-url` or AZURE_OPENAI_ENDPOINT
    (`https://RESOURCE.openai.azure.com`). Without an API version the v1 API is used
    (`.../openai/v1/`, the plain OpenAI client); with `--api-version` (or OPENAI_API_VERSION)
    the dated API, whose input lines name `/chat/completions` without `/v1`: the adapter
    rewrites the lines' `url` on upload. Each row's `model` must be the batch deployment's
    name (`--model DEPLOYMENT` sets it on every row).

    A create refused with `token_limit_exceeded` (the deployment's enqueued-token quota is
    full) is a retryable error: the runner backs off and creates the batch later.
    """

    name = "azure"
    key_env = "AZURE_OPENAI_API_KEY"
    base_url_env = "AZURE_OPENAI_ENDPOINT"
    default_limits = AZURE_LIMITS
    endpoints = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/embeddings"})

    def __init__(self, *, api_version: str | None = None, **kwargs: Any) -> None:
        self.api_version = api_version or os.environ.get("OPENAI_API_VERSION") or None
        super().__init__(**kwargs)

    def _make_client(self, key: str, max_retries: int, timeout: float) -> openai.AsyncOpenAI:
        if not self.base_url:
            raise ConfigError(
                "the azure provider needs the resource endpoint: set AZURE_OPENAI_ENDPOINT or pass --base-url "
                "(https://RESOURCE.openai.azure.com)"
            )
        root = self.base_url.rstrip("/")
        if self.api_version:
            root = root.removesuffix("/openai/v1").removesuffix("/openai")
            self.base_url = root
            return openai.AsyncAzureOpenAI(
                api_key=key, azure_endpoint=root, api_version=self.api_version, max_retries=max_retries, timeout=timeout
            )
        if not root.endswith("/openai/v1"):
            root = root.removesuffix("/openai") + "/openai/v1"
        self.base_url = root + "/"
        return openai.AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout)

    def _wire_endpoint(self, endpoint: str) -> str:
        return endpoint.removeprefix("/v1") if self.api_version else endpoint

    @property
    def _files_expire(self) -> bool:
        # Dated versions before 2025-03-01 may not know `expires_after`: leave them the default.
        return self.api_version is None or self.api_version >= AZURE_EXPIRY_SINCE_VERSION

    async def upload(self, tag: str, path: Path) -> str:
        src = path
        if self.api_version:  # the dated API wants `/chat/completions` in every line's url
            src = path.with_name(path.name + ".azure")
            with open(path, "rb") as lines, open(src, "wb") as dst:
                for line in lines:
                    if line.strip():
                        rec = orjson.loads(line)
                        rec["url"] = self._wire_endpoint(rec.get("url") or "")
                        dst.write(orjson.dumps(rec) + b"\n")
        expiry: dict[str, Any] = (
            {"expires_after": {"anchor": "created_at", "seconds": AZURE_FILE_TTL_SECONDS}} if self._files_expire else {}
        )
        try:
            with open(src, "rb") as fh:
                f = await self._call(
                    "upload",
                    lambda: self._once.files.create(file=(tagged_filename(tag), fh), purpose="batch", **expiry),
                )
            return f.id
        finally:
            if src != path:
                src.unlink(missing_ok=True)

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        if completion_window != "24h":
            raise ConfigError(
                f"Azure batches take only a 24h completion window (got {completion_window!r}): "
                "drop --completion-window (Azure lets a batch run past 24h rather than expire it)"
            )
        # Output files count against the same cap as uploads: let them expire too.
        expiry: dict[str, Any] = (
            {"output_expires_after": {"anchor": "created_at", "seconds": AZURE_FILE_TTL_SECONDS}}
            if self._files_expire
            else {}
        )
        try:
            b = await self._call(
                "creating a batch",
                lambda: self._once.batches.create(
                    input_file_id=file_id,
                    endpoint=self._wire_endpoint(endpoint),  # type: ignore[arg-type]
                    completion_window="24h",
                    metadata={TAG_KEY: tag, JOB_KEY: job},
                    **expiry,
                ),
            )
            return _remote(b)
        except ProviderError as exc:
            if AZURE_TOKEN_LIMIT_CODE not in f"{exc} {exc.body}":
                raise
            raise ProviderError(
                f"creating a batch: Azure refused it with {AZURE_TOKEN_LIMIT_CODE}: the deployment's enqueued-token "
                "quota is full until running batches finish (raise the quota, or pass --max-enqueued-tokens)",
                status=429,
                body=exc.body,
            ) from exc
