"""Mistral's Batch API, through the official `mistralai` SDK (1.9 and later).

Mistral runs OpenAI-like bodies on the same paths (`/v1/chat/completions`, `/v1/embeddings`,
`/v1/moderations`), so the translation is mostly of the envelope: input lines are
`{"custom_id", "body"}`, statuses are upper case (`SUCCESS`, `TIMEOUT_EXCEEDED`, ...), a batch
names its result files `output_file` / `error_file`. A few parameters differ by name
(`max_completion_tokens` and `seed` become `max_tokens` and `random_seed`, `dimensions` becomes
`output_dimension`); parameters Mistral lacks are rejected at ingest. Result bodies are
rewritten into OpenAI's shapes (text out of content chunks, tool call arguments as strings,
`model_length` as `length`, a `flagged` per moderation result), the line as Mistral sent it
kept under `"native"`.

Batches carry llmbatch's metadata (`llmbatch_chunk`, `llmbatch_job`) and name their input
files, so `find_batch` matches either and its answer is certain. Every line keeps its `model`,
and the job names it as well (remembered from the upload, or read from the file's first line
when another process uploaded it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from .._exceptions import ConfigError, ProviderError
from ._base import JOB_KEY, TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus
from ._chat import (
    chat_completion,
    content_part_reasons,
    error_body,
    error_fields,
    error_result,
    failed_line,
    not_run_line,
    openai_like_line,
    parse_json,
    split_lines,
    text_of,
    write_lines,
)
from ._openai import tagged_filename

try:  # mistralai >= 2
    from mistralai.client import Mistral
except ImportError:  # mistralai 1.x
    from mistralai import Mistral  # type: ignore[attr-defined,no-redef]

try:
    from mistralai.client.errors import MistralError
except ImportError:
    from mistralai.models import MistralError  # type: ignore[no-redef]

__all__ = ["MISTRAL_LIMITS", "MistralBatchProvider"]

T = TypeVar("T")
log = logging.getLogger("llmbatch.providers")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of either HTTP client the SDK may be built on (httpx; httpx2 from 3.x)."""
    kinds: list[type[BaseException]] = [httpx.TransportError]
    try:
        import httpx2

        kinds.append(httpx2.TransportError)
    except ImportError:
        pass
    return tuple(kinds)


_TRANSPORT_ERRORS = _transport_errors()

#: 1M requests per batch (the reference); 500 MB keeps a chunk under the 512 MB file upload cap
#: either way "MB" is read; 20 in flight like OpenAI, as Mistral publishes no such limit.
MISTRAL_LIMITS = ProviderLimits(max_requests=1_000_000, max_bytes=500_000_000, max_in_flight=20)

DEFAULT_BASE_URL = "https://api.mistral.ai"

_STATUS = {
    "QUEUED": RemoteStatus.VALIDATING,
    "RUNNING": RemoteStatus.IN_PROGRESS,
    "SUCCESS": RemoteStatus.COMPLETED,
    "FAILED": RemoteStatus.FAILED,
    "TIMEOUT_EXCEEDED": RemoteStatus.EXPIRED,
    "CANCELLATION_REQUESTED": RemoteStatus.CANCELLING,
    "CANCELLED": RemoteStatus.CANCELLED,
}

# -- requests ------------------------------------------------------------------------------

#: Chat parameters Mistral takes as OpenAI does, and its own ones (SDK `ChatCompletionRequest`).
_CHAT_PARAMS = frozenset(
    {
        "model", "messages", "temperature", "top_p", "max_tokens", "stream", "stop", "response_format", "tools",
        "tool_choice", "presence_penalty", "frequency_penalty", "n", "prediction", "parallel_tool_calls",
        "reasoning_effort", "metadata", "logprobs", "top_logprobs", "prompt_cache_key",
        "random_seed", "safe_prompt", "prompt_mode", "min_tokens", "repetition_penalty", "top_k", "guardrails",
        "prompt_logprobs", "top_prompt_logprobs", "service_tier",
    }
)  # fmt: skip
_EMBEDDING_PARAMS = frozenset({"model", "input", "encoding_format", "output_dimension", "output_dtype", "metadata"})
_MODERATION_PARAMS = frozenset({"model", "input", "metadata"})
#: OpenAI names Mistral spells differently.
_RENAMED = {
    "/v1/chat/completions": {"max_completion_tokens": "max_tokens", "seed": "random_seed"},
    "/v1/embeddings": {"dimensions": "output_dimension"},
    "/v1/moderations": {},
}
_PARAMS = {
    "/v1/chat/completions": _CHAT_PARAMS,
    "/v1/embeddings": _EMBEDDING_PARAMS,
    "/v1/moderations": _MODERATION_PARAMS,
}
#: Keys each message role may carry (`developer` is sent as `system`).
_MESSAGE_KEYS = {
    "system": {"role", "content"},
    "developer": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", "prefix"},
    "tool": {"role", "content", "tool_call_id", "name"},
}
_CONTENT_TYPES = frozenset({"text", "image_url", "input_audio"})


def _check_messages(messages: Any) -> list[str]:
    reasons: list[str] = []
    for n, m in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(m, dict):
            continue
        role = m.get("role")
        allowed = _MESSAGE_KEYS.get(role)
        if allowed is None:
            reasons.append(f"messages[{n}]: Mistral has no {role!r} role")
            continue
        extra = sorted(k for k, v in m.items() if k not in allowed and v is not None)
        if extra:
            reasons.append(f"messages[{n}]: Mistral's {role} messages have no {', '.join(extra)}")
        reasons += content_part_reasons(n, m.get("content"), _CONTENT_TYPES, "Mistral")
    return reasons


def check_mistral(endpoint: str, body: dict[str, Any]) -> list[str]:
    """Why Mistral cannot run this OpenAI request body at `endpoint` (a batched one)."""
    params, renamed = _PARAMS[endpoint], _RENAMED[endpoint]
    reasons: list[str] = []
    for key, value in body.items():
        if value is None or key in params:
            continue
        if key in renamed:
            if body.get(renamed[key]) not in (None, value):
                reasons.append(f"{key} and {renamed[key]} differ (Mistral has only {renamed[key]})")
        else:
            reasons.append(f"Mistral's {endpoint} has no `{key}` parameter")
    if endpoint == "/v1/chat/completions":
        if body.get("service_tier") not in (None, "auto"):
            reasons.append(f"service_tier {body['service_tier']!r}: Mistral's tiers are not OpenAI's")
        for tool in body.get("tools") or []:
            if isinstance(tool, dict) and tool.get("type", "function") != "function":
                reasons.append(f"Mistral takes only function tools, not {tool.get('type')!r}")
        reasons += _check_messages(body.get("messages"))
    elif endpoint == "/v1/moderations":
        inp = body.get("input")
        if isinstance(inp, list) and not all(isinstance(i, str) for i in inp):
            reasons.append("Mistral moderates text only: input must be a string or a list of strings")
    return reasons


def _message(m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    out = {k: v for k, v in m.items() if v is not None or k == "content"}
    if out.get("role") == "developer":
        out["role"] = "system"
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = [
            {"type": "input_audio", "input_audio": p["input_audio"].get("data")}
            if isinstance(p, dict) and p.get("type") == "input_audio" and isinstance(p.get("input_audio"), dict)
            else p
            for p in content
        ]
    return out


def to_mistral(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI request body (one `check_mistral` passes) as Mistral's `endpoint` takes it."""
    renamed = _RENAMED.get(endpoint, {})
    out: dict[str, Any] = {}
    for key, value in body.items():
        if value is None:
            continue
        out[renamed.get(key, key)] = value
    if "messages" in out:
        out["messages"] = [_message(m) for m in out["messages"]]
    return out


# -- results -------------------------------------------------------------------------------

_FINISH_REASONS = {"stop": "stop", "length": "length", "model_length": "length", "tool_calls": "tool_calls"}


class _ModelError(Exception):
    """A 200 answer whose choice ended in `finish_reason: "error"`: Mistral's own failure."""


def _error_body(body: Any, status: int) -> dict[str, Any]:
    """OpenAI's `{"error": {message, type, param, code}}` from Mistral's flat `{object: "error", message, ...}`
    (or a `{detail}` answer)."""
    return error_body(body, status, ("message", "detail", "error"))


def _tool_calls(calls: Any) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    out = []
    for n, c in enumerate(calls):
        fn = c.get("function") or {}
        args = fn.get("arguments")
        out.append(
            {
                "id": c.get("id") or f"call_{n}",
                "type": "function",
                "function": {
                    "name": fn.get("name"),
                    "arguments": args if isinstance(args, str) else orjson.dumps(args or {}).decode(),
                },
            }
        )
    return out


def _chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Mistral chat completion as OpenAI's (every choice kept)."""
    usage = body.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or usage.get("num_cached_tokens") or 0
    out = chat_completion(
        id=body.get("id") or "",
        model=body.get("model") or "",
        created=body.get("created") or 0,
        content=None,
        finish_reason="stop",
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        cached_tokens=cached,
    )
    choices = []
    for n, c in enumerate(body.get("choices") or []):
        finish = c.get("finish_reason")
        if finish == "error":
            raise _ModelError("Mistral stopped generating this answer with an error")
        msg = c.get("message") or {}
        content = msg.get("content")
        message: dict[str, Any] = {
            "role": "assistant",
            # Thinking chunks have no place in an OpenAI message: they stay in "native".
            "content": text_of(content) if isinstance(content, list) else content,
            "refusal": None,
        }
        calls = _tool_calls(msg.get("tool_calls"))
        if calls:
            message["tool_calls"] = calls
        choices.append(
            {
                "index": c.get("index", n),
                "message": message,
                "logprobs": c.get("logprobs"),
                "finish_reason": _FINISH_REASONS.get(finish, finish),
            }
        )
    out["choices"] = choices
    return out


def _success_body(body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("choices"), list):
        return _chat_body(body)
    if isinstance(body, dict) and isinstance(body.get("results"), list):  # moderations
        results = [
            {"flagged": any((r.get("categories") or {}).values()), **r} if isinstance(r, dict) else r
            for r in body["results"]
        ]
        return {**body, "results": results}
    return body


def openai_line(rec: dict[str, Any]) -> dict[str, Any]:
    """One Mistral result line as an OpenAI batch output line (the original under "native" if changed)."""
    try:
        return openai_like_line(rec, "Mistral", success=_success_body, failure=_error_body, error_line=_error_line)
    except _ModelError as exc:
        return error_result(rec.get("custom_id"), 500, str(exc), native=rec)


def _error_line(cid: Any, error: Any) -> dict[str, Any]:
    """A line for a request Mistral reports only as an error: a bare string or `{message, code, type}`."""
    message, code, etype, status = error_fields(error)
    if code in ("batch_expired", "timeout_exceeded"):
        return not_run_line(cid, "batch_expired", message)
    if code in ("batch_cancelled", "cancelled"):
        return not_run_line(cid, "batch_cancelled", message)
    return failed_line(cid, message, code, etype, status)


def _hours(window: str) -> int:
    """`completion_window` ("24h", "2d") as Mistral's `timeout_hours`."""
    w = window.strip().lower()
    try:
        if w.endswith("d"):
            return int(w[:-1]) * 24
        return int(w.removesuffix("h"))
    except ValueError:
        raise ConfigError(
            f"completion window {window!r}: the mistral provider takes hours (24h) or days (2d)"
        ) from None


def _remote(job: Any) -> RemoteBatch:
    status = _STATUS.get(str(job.status))
    if status is None:
        log.warning("Mistral batch %s has an unknown status %r; treating it as in progress", job.id, job.status)
        status = RemoteStatus.IN_PROGRESS
    errors = [
        {
            "code": "batch_error",
            "message": e.message if (e.count or 1) <= 1 else f"{e.message} ({e.count} requests)",
            "param": None,
            "line": None,
        }
        for e in job.errors or []
    ]
    metadata = job.metadata if isinstance(job.metadata, dict) else {}
    return RemoteBatch(
        id=job.id,
        status=status,
        output_file_id=job.output_file or None,
        error_file_id=job.error_file or None,
        total=job.total_requests or 0,
        completed=job.succeeded_requests or 0,
        failed=job.failed_requests or 0,
        counts_live=True,  # succeeded_requests / failed_requests move while the job runs
        errors=errors,
        metadata={str(k): str(v) for k, v in metadata.items()},
        created_at=job.created_at or 0,
        # llmbatch's batches run one file; the run-start audit reads a lost batch's rows from it.
        input_file_id=job.input_files[0] if len(job.input_files or []) == 1 else None,
    )


class MistralBatchProvider(Provider):
    """Mistral's Batch API (chat completions, embeddings, moderations)."""

    name = "mistral"
    key_env = "MISTRAL_API_KEY"
    endpoints = frozenset(_PARAMS)
    #: Page size for listing batches and files.
    page_size = 100

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        limits: ProviderLimits | None = None,
        timeout: float = 600.0,
    ) -> None:
        key = self.api_key_from(api_key)
        # The SDK's paths start with /v1: the server URL is the root.
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/").removesuffix("/v1")
        self.limits = limits or MISTRAL_LIMITS
        self._key = key
        self._client = Mistral(api_key=key, server_url=self.base_url, timeout_ms=int(timeout * 1000))
        #: The model of each file this process uploaded (a chunk holds one model).
        self._models: dict[str, str] = {}

    @classmethod
    def check_request(cls, endpoint: str, body: dict[str, Any]) -> list[str]:
        return super().check_request(endpoint, body) or check_mistral(endpoint, body)

    async def aclose(self) -> None:
        client = getattr(self._client.sdk_configuration, "async_client", None)
        if client is not None:
            await client.aclose()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Runs an SDK call, translating its errors once, here at the boundary."""
        try:
            return await fn()
        except MistralError as exc:
            status = exc.status_code
            message = _error_body(parse_json(exc.body), status)["error"]["message"]
            raise ProviderError(f"{what} failed: HTTP {status}: {message}", status=status, body=exc.body) from exc
        except _TRANSPORT_ERRORS as exc:
            raise ProviderError(f"{what} failed: cannot reach {self.base_url}: {exc!r}") from exc
        except Exception as exc:
            if type(exc).__name__ == "NoResponseError":
                raise ProviderError(f"{what} failed: no answer from {self.base_url}") from exc
            raise

    async def upload(self, tag: str, path: Path) -> str:
        name = tagged_filename(tag)
        wire = path.with_name(name)
        model = None
        with open(path, "rb") as src, open(wire, "wb") as dst:
            for raw in src:
                if raw.strip():
                    rec = orjson.loads(raw)
                    body = to_mistral(rec["url"], rec["body"])
                    model = model or body.get("model")
                    dst.write(orjson.dumps({"custom_id": rec["custom_id"], "body": body}) + b"\n")
        try:
            with open(wire, "rb") as fh:
                f = await self._call(
                    "upload",
                    lambda: self._client.files.upload_async(file={"file_name": name, "content": fh}, purpose="batch"),
                )
        finally:
            wire.unlink(missing_ok=True)
        if model:
            self._models[f.id] = model
        return f.id

    async def _model_of(self, file_id: str) -> str | None:
        """The model an uploaded chunk names: remembered from the upload, else read from its first line."""
        if file_id not in self._models:

            async def first_line() -> bytes:
                resp = await self._client.files.download_async(file_id=file_id)
                try:
                    async for line in split_lines(resp.aiter_bytes()):
                        return line
                    return b""
                finally:
                    await resp.aclose()

            line = await self._call(f"reading {file_id}", first_line)
            try:
                model = orjson.loads(line)["body"]["model"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return None
            if isinstance(model, str):
                self._models[file_id] = model
        return self._models.get(file_id)

    async def _pages(self, what: str, fetch: Callable[[int], Awaitable[Any]]) -> AsyncIterator[list[Any]]:
        """The `data` of each page of a `{data, total}` listing, from page 0 on."""
        page = 0
        while True:
            listed = await self._call(what, lambda p=page: fetch(p))
            data = listed.data or []
            yield data
            page += 1
            total = listed.total if isinstance(listed.total, int) else None
            if len(data) < self.page_size or (total is not None and page * self.page_size >= total):
                return

    async def find_upload(self, tag: str, since: int) -> str | None:
        name = tagged_filename(tag)
        found: list[Any] = []

        def fetch(page: int) -> Awaitable[Any]:
            return self._client.files.list_async(page=page, page_size=self.page_size, purpose="batch", search=name)

        async for data in self._pages("listing files", fetch):
            found += [f for f in data if f.filename == name and (f.created_at or 0) >= since]
        return max(found, key=lambda f: f.created_at or 0).id if found else None

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        hours = _hours(completion_window)
        # Each line names its model too; the job's own is what Mistral's docs lead with.
        model = await self._model_of(file_id)
        named = {"model": model} if model else {}
        created = await self._call(
            "creating a batch",
            lambda: self._client.batch.jobs.create_async(
                input_files=[file_id],
                endpoint=endpoint,  # type: ignore[arg-type]
                metadata={TAG_KEY: tag, JOB_KEY: job},
                timeout_hours=hours,
                **named,
            ),
        )
        return _remote(created)

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        after = datetime.fromtimestamp(max(since, 0), UTC)

        def fetch(page: int) -> Awaitable[Any]:
            return self._client.batch.jobs.list_async(page=page, page_size=self.page_size, created_after=after)

        async for data in self._pages("listing batches", fetch):
            for j in data:
                meta = j.metadata if isinstance(j.metadata, dict) else {}
                if meta.get(TAG_KEY) == tag or (file_id is not None and file_id in (j.input_files or [])):
                    return _remote(j)
        return None

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        # One listing, from `since` on (the API filters by `created_after`), every page of it.
        after = datetime.fromtimestamp(max(since, 0), UTC)
        found: list[RemoteBatch] = []

        def fetch(page: int) -> Awaitable[Any]:
            return self._client.batch.jobs.list_async(page=page, page_size=self.page_size, created_after=after)

        async for data in self._pages("listing batches", fetch):
            for j in data:
                meta = j.metadata if isinstance(j.metadata, dict) else {}
                if meta.get(JOB_KEY) == job_id and meta.get(TAG_KEY):
                    found.append(_remote(j))
        return found

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        return _remote(await self._call("polling a batch", lambda: self._client.batch.jobs.get_async(job_id=batch_id)))

    async def download(self, file_id: str, dest: Path) -> None:
        async def fetch() -> None:
            tmp = dest.with_suffix(dest.suffix + ".part")
            resp = await self._client.files.download_async(file_id=file_id)
            try:
                with open(tmp, "wb") as out:
                    await write_lines(resp.aiter_bytes(), out, openai_line, "Mistral", file_id)
            finally:
                await resp.aclose()
            os.replace(tmp, dest)

        await self._call(f"downloading {file_id}", fetch)

    async def cancel(self, batch_id: str) -> RemoteBatch:
        return _remote(
            await self._call("cancelling a batch", lambda: self._client.batch.jobs.cancel_async(job_id=batch_id))
        )

    async def delete_file(self, file_id: str) -> None:
        await self._call("deleting a file", lambda: self._client.files.delete_async(file_id=file_id))

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        if endpoint not in self.endpoints:
            return 400, _error_body(f"the mistral provider cannot send {endpoint}", 400)
        client = self._client.sdk_configuration.async_client
        try:
            resp = await client.post(
                self.base_url + endpoint,
                json=to_mistral(endpoint, body),
                headers={"Authorization": f"Bearer {self._key}", "Accept": "application/json"},
            )
        except _TRANSPORT_ERRORS as exc:
            return 502, {"error": {"message": f"cannot reach the direct API: {exc!r}", "type": "connection_error"}}
        answer = parse_json(resp.content)
        if not 200 <= resp.status_code < 300:
            return resp.status_code, _error_body(answer, resp.status_code)
        try:
            return resp.status_code, _success_body(answer)
        except _ModelError as exc:
            return 500, _error_body(str(exc), 500)
