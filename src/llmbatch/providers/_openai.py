"""OpenAI's Batch API, and any server that speaks it (llmbatch's own, vLLM gateways, ...).

Uses the official `openai` SDK. A chunk's tag goes into the uploaded file's name and into
the batch's metadata, so that after a crash the runner can list and match instead of
creating a second upload or, worse, a second batch.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import openai

from .._exceptions import ConfigError, ProviderError
from ._base import JOB_KEY, TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus

__all__ = ["OpenAIBatchProvider", "tagged_filename"]

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
        errors=errors,
        metadata=dict(b.metadata or {}),
        created_at=b.created_at,
    )


class OpenAIBatchProvider(Provider):
    """An OpenAI-compatible Batch API at `base_url` (default OpenAI's)."""

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        limits: ProviderLimits = OPENAI_LIMITS,
        max_retries: int = 5,
        timeout: float = 600.0,
    ) -> None:
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ConfigError("the openai provider needs an API key: set OPENAI_API_KEY or pass --api-key")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.limits = limits
        self._client = openai.AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout)

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

    async def upload(self, tag: str, path: Path) -> str:
        with open(path, "rb") as fh:
            f = await self._call(
                "upload", lambda: self._client.files.create(file=(tagged_filename(tag), fh), purpose="batch")
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
            lambda: self._client.batches.create(
                input_file_id=file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=completion_window,  # type: ignore[arg-type]
                metadata={TAG_KEY: tag, JOB_KEY: job},
            ),
        )
        return _remote(b)

    async def find_batch(self, tag: str, since: int) -> RemoteBatch | None:
        async def scan() -> RemoteBatch | None:
            async for b in self._client.batches.list(limit=100):
                if b.created_at < since:
                    return None  # newest first
                if (b.metadata or {}).get(TAG_KEY) == tag:
                    return _remote(b)
            return None

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
