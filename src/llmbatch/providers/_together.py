"""Together AI's Batch API, through the official `together` SDK (v2 or v3).

Together runs OpenAI chat completion bodies, so what changes is the envelope: input lines are
`{"custom_id", "body"}` (no method or url), statuses are upper case, `GET /batches` answers a
bare array and API errors are `{"error": "string"}`. Result lines are OpenAI-like; `download`
rewrites what differs (finish reason `eos`, error bodies, missing usage details) and keeps the
line as Together sent it under `"native"`.

A Together batch has no metadata. The chunk's tag rides in the uploaded file's name
(`llmbatch-<tag>.jsonl`), and a batch is matched to its chunk by its input file, which is the
chunk's own upload: so `find_batch` is certain when it knows the file, and refuses to guess
when it does not.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import together

from .._exceptions import ProviderError
from ._base import TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus
from ._chat import (
    HTTP_STATUS_OF_ERROR,
    content_part_reasons,
    error_body,
    error_fields,
    failed_line,
    not_run_line,
    openai_like_line,
    write_lines,
)
from ._openai import tagged_filename

__all__ = ["TOGETHER_LIMITS", "TogetherBatchProvider"]

T = TypeVar("T")
log = logging.getLogger("llmbatch.providers")

#: Together's published limits (shared/reference/provider-batch-apis.md, section 5).
TOGETHER_LIMITS = ProviderLimits(max_requests=50_000, max_bytes=100 * 1024 * 1024, max_in_flight=20)

# together 3 moved `/v1` from the default base URL into every request path.
_V1_IN_PATHS = int(together.__version__.split(".")[0]) >= 3

_STATUS = {
    "VALIDATING": RemoteStatus.VALIDATING,
    "IN_PROGRESS": RemoteStatus.IN_PROGRESS,
    "COMPLETED": RemoteStatus.COMPLETED,
    "FAILED": RemoteStatus.FAILED,
    "EXPIRED": RemoteStatus.EXPIRED,
    "CANCELING": RemoteStatus.CANCELLING,
    "CANCELLING": RemoteStatus.CANCELLING,
    "CANCELLED": RemoteStatus.CANCELLED,
}

#: Chat completion parameters Together takes as OpenAI does (its SDK's `chat.completions.create`).
_CHAT_PARAMS = frozenset(
    {
        "model", "messages", "max_tokens", "stop", "temperature", "top_p", "top_k", "n", "seed", "stream",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "response_format",
        "tools", "tool_choice", "function_call", "reasoning", "reasoning_effort", "echo", "safety_model",
        "context_length_exceeded_behavior", "chat_template_kwargs", "compliance",
    }
)  # fmt: skip
#: Message content part types Together's chat endpoint accepts.
_CONTENT_TYPES = frozenset({"text", "image_url", "video_url", "audio_url", "input_audio"})
_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def _check_chat(body: dict[str, Any]) -> list[str]:
    reasons: list[str] = []
    for key, value in body.items():
        if value is None or key in _CHAT_PARAMS:
            continue
        if key == "max_completion_tokens":
            if body.get("max_tokens") not in (None, value):
                reasons.append("max_completion_tokens and max_tokens differ (Together has only max_tokens)")
        elif key == "logprobs":
            # Together's `logprobs` is a count and its answer is not OpenAI's shape: only the
            # native integer form passes.
            if value is True:
                reasons.append("logprobs: Together returns log probabilities in its own shape, not OpenAI's")
        else:
            reasons.append(f"Together's chat completions have no `{key}` parameter")
    for n, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        reasons += content_part_reasons(n, content, _CONTENT_TYPES, "Together")
    return reasons


def to_together(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion body as Together's chat endpoint takes it."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key == "max_completion_tokens":
            if value is not None:
                out["max_tokens"] = value
        elif key == "logprobs" and value is False:
            continue
        else:
            out[key] = value
    if any(isinstance(m, dict) and m.get("role") == "developer" for m in out.get("messages") or []):
        out["messages"] = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
            for m in out["messages"]
        ]
    return out


# -- result lines --------------------------------------------------------------------------


def _chat_body(body: Any) -> Any:
    """A chat completion with OpenAI's finish reasons and usage details (other bodies as they are)."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return body
    out = dict(body)
    out["choices"] = [
        {**c, "finish_reason": _FINISH_REASONS.get(c.get("finish_reason"), c.get("finish_reason"))}
        if isinstance(c, dict) else c
        for c in body["choices"]
    ]  # fmt: skip
    usage = body.get("usage")
    if isinstance(usage, dict):
        usage = dict(usage)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or usage.get("cached_tokens") or 0
        reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
        usage["prompt_tokens_details"] = {**(usage.get("prompt_tokens_details") or {}), "cached_tokens": cached}
        usage["completion_tokens_details"] = {
            **(usage.get("completion_tokens_details") or {}),
            "reasoning_tokens": reasoning,
        }
        out["usage"] = usage
    return out


def openai_line(rec: dict[str, Any]) -> dict[str, Any]:
    """One Together result line as an OpenAI batch output line (the original under "native" if changed)."""
    return openai_like_line(rec, "Together", success=_chat_body, failure=error_body, error_line=_error_line)


def _error_line(cid: Any, error: Any) -> dict[str, Any]:
    """A line for a request Together reports only as an error: a string or `{message, code, type}`."""
    message, code, etype, status = error_fields(error, ("status_code", "status"))
    if isinstance(code, str) and code.isdigit():  # digits outside 100-599 are taken as a status too
        status, code = status or int(code), None
    if code in ("batch_expired", "expired") or etype == "expired":
        return not_run_line(cid, "batch_expired", message)
    if code in ("batch_cancelled", "cancelled") or etype == "cancelled":
        return not_run_line(cid, "batch_cancelled", message)
    if status is None and code in _BAD_REQUEST_CODES and not HTTP_STATUS_OF_ERROR.get(etype or ""):
        # Together's error file names the problem, not a status ("invalid_model"): such a row
        # fails the same way every time, so it is a 400, never retried; "timeout" and codes
        # not known here stay retryable.
        status, etype = 400, etype or "invalid_request_error"
    return failed_line(cid, message, code, etype, status)


#: Error codes of Together's error file that mean the request itself is wrong.
_BAD_REQUEST_CODES = frozenset(
    {"invalid_model", "invalid_request", "invalid_request_error", "invalid_argument", "invalid_parameter",
     "invalid_json", "model_not_found", "context_length_exceeded", "validation_error", "bad_request"}
)  # fmt: skip


def _existing_file(exc: ProviderError) -> str | None:
    """The id of the identical file a 409 upload answer names, if it names one."""
    body = exc.body
    if exc.status != 409:
        return None
    if isinstance(body, str | bytes):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    file_id = body.get("file_id") if isinstance(body, dict) else None
    return file_id if isinstance(file_id, str) else None


def _unix(value: Any) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, str) and value:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    return int(value or 0)


def _remote(job: Any) -> RemoteBatch:
    status = _STATUS.get(job.status or "")
    if status is None:
        log.warning("Together batch %s has an unknown status %r; treating it as in progress", job.id, job.status)
        status = RemoteStatus.IN_PROGRESS
    errors = [{"code": "batch_failed", "message": job.error, "param": None, "line": None}] if job.error else []
    return RemoteBatch(
        id=job.id,
        status=status,
        output_file_id=job.output_file_id or None,
        error_file_id=job.error_file_id or None,
        errors=errors,
        created_at=_unix(job.created_at),
        input_file_id=job.input_file_id or None,
        # Together gives no counts, only a percentage (0-100) of the batch done.
        fraction_done=min(max(float(job.progress), 0.0), 100.0) / 100 if job.progress is not None else None,
    )


class TogetherBatchProvider(Provider):
    """Together AI's Batch API (`/v1/chat/completions`)."""

    name = "together"
    key_env = "TOGETHER_API_KEY"
    base_url_env = "TOGETHER_BASE_URL"
    endpoints = frozenset({"/v1/chat/completions"})
    #: Together allows custom_ids of up to 64 characters; others go under a runner-made id.
    custom_id_pattern = re.compile(r"[\x20-\x7e]{1,64}")
    batches_known_by_upload = True

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
        url = self.base_url_from(base_url)
        if url:
            # Accept the root or the `/v1` URL whichever SDK major is installed.
            root = url.rstrip("/").removesuffix("/v1")
            url = root if _V1_IN_PATHS else root + "/v1"
        self.base_url = url
        self.limits = limits or TOGETHER_LIMITS
        self._client = together.AsyncTogether(api_key=key, base_url=url, max_retries=max_retries, timeout=timeout)

    @classmethod
    def check_request(cls, endpoint: str, body: dict[str, Any]) -> list[str]:
        return super().check_request(endpoint, body) or _check_chat(body)

    async def aclose(self) -> None:
        await self._client.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Runs an SDK call, translating its errors once, here at the boundary."""
        try:
            return await fn()
        except together.APIStatusError as exc:
            message = error_body(exc.body, exc.status_code)["error"]["message"]
            raise ProviderError(
                f"{what} failed: HTTP {exc.status_code}: {message}", status=exc.status_code, body=exc.body
            ) from exc
        except together.APIConnectionError as exc:
            where = self.base_url or "api.together.ai"
            raise ProviderError(f"{what} failed: cannot reach {where}: {exc}") from exc

    def _path(self, endpoint: str) -> str:
        return endpoint if _V1_IN_PATHS else endpoint.removeprefix("/v1")

    async def upload(self, tag: str, path: Path) -> str:
        # The SDK names the upload after the file on disk, so the translated copy carries the tag.
        wire = path.with_name(tagged_filename(tag))
        with open(path, "rb") as src, open(wire, "wb") as dst:
            for raw in src:
                if raw.strip():
                    rec = orjson.loads(raw)
                    dst.write(orjson.dumps({"custom_id": rec["custom_id"], "body": to_together(rec["body"])}) + b"\n")
        # No retries inside the SDK: it would retry the 409 that names an identical file (with
        # backoff, for nothing); a failed upload is looked up and redone by the runner.
        client = self._client.with_options(max_retries=0)
        try:
            f = await self._call("upload", lambda: client.files.upload(wire, purpose="batch-api", check=False))
        except ProviderError as exc:
            # Together keeps one file per checksum; together < 3 reports the earlier one as a 409.
            existing = _existing_file(exc)
            if existing is None:
                raise
            return existing
        finally:
            wire.unlink(missing_ok=True)
        return f.id

    async def find_upload(self, tag: str, since: int) -> str | None:
        name = tagged_filename(tag)
        files = await self._call("listing files", lambda: self._client.files.list())
        mine = [
            f for f in files.data
            if f.filename == name and (f.created_at or 0) >= since
            and getattr(f, "processing_status", None) not in ("FAILED", "INVALID_FORMAT")
        ]  # fmt: skip
        return max(mine, key=lambda f: f.created_at or 0).id if mine else None

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        # No retries inside the SDK: an answer lost after the batch was made would make a second
        # one. The runner asks `find_batch` instead.
        client = self._client.with_options(max_retries=0)
        created = await self._call(
            "creating a batch",
            lambda: client.batches.create(
                endpoint=endpoint,  # type: ignore[arg-type]
                input_file_id=file_id,
                completion_window=completion_window,
            ),
        )
        if created.warning:
            log.warning("Together, creating the batch for %s: %s", tag, created.warning)
        if created.job is None or not created.job.id:
            raise ProviderError("creating a batch: Together answered without the batch job")
        return _remote(created.job)

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        if file_id is None:
            raise ProviderError(
                f"cannot tell whether chunk {tag} has a Together batch: batches carry no tag, and its upload is "
                "unknown",
                status=503,
            )
        jobs = await self._call("listing batches", lambda: self._client.batches.list())
        mine = [j for j in jobs if j.input_file_id == file_id and _unix(j.created_at) >= since]
        return _remote(max(mine, key=lambda j: _unix(j.created_at))) if mine else None

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        # Batches carry no tag: the job's are those whose input file is one of its uploads, named
        # `llmbatch-<job>-cNNNNN.jsonl`. One listing of files and one of batches (neither pages).
        # A batch whose upload was deleted (once its results were collected, unless the job keeps
        # its uploads) can no longer be told to be this job's.
        prefix, suffix = tagged_filename(f"{job_id}-c").removesuffix(".jsonl"), ".jsonl"
        files = await self._call("listing files", lambda: self._client.files.list())
        tags = {
            f.id: f.filename.removeprefix("llmbatch-").removesuffix(suffix)
            for f in files.data
            if f.filename and f.filename.startswith(prefix) and f.filename.endswith(suffix)
        }
        jobs = await self._call("listing batches", lambda: self._client.batches.list())
        found = []
        for j in jobs:
            if j.input_file_id in tags and _unix(j.created_at) >= since:
                b = _remote(j)
                b.metadata[TAG_KEY] = tags[j.input_file_id]
                found.append(b)
        return found

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        return _remote(await self._call("polling a batch", lambda: self._client.batches.retrieve(batch_id)))

    async def download(self, file_id: str, dest: Path) -> None:
        async def fetch() -> None:
            tmp = dest.with_suffix(dest.suffix + ".part")
            async with self._client.files.with_streaming_response.content(file_id) as resp:
                with open(tmp, "wb") as out:
                    await write_lines(resp.iter_bytes(1 << 20), out, openai_line, "Together", file_id)
            os.replace(tmp, dest)

        await self._call(f"downloading {file_id}", fetch)

    async def cancel(self, batch_id: str) -> RemoteBatch:
        return _remote(await self._call("cancelling a batch", lambda: self._client.batches.cancel(batch_id)))

    async def delete_file(self, file_id: str) -> None:
        await self._call("deleting a file", lambda: self._client.files.delete(file_id))

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        if endpoint not in self.endpoints:
            return 400, error_body(f"the together provider cannot send {endpoint}", 400)
        try:
            answer = await self._client.post(self._path(endpoint), body=to_together(body), cast_to=object)
        except together.APIStatusError as exc:
            return exc.status_code, error_body(exc.body, exc.status_code)
        except together.APIConnectionError as exc:
            return 502, {"error": {"message": f"cannot reach the direct API: {exc}", "type": "connection_error"}}
        return 200, _chat_body(answer)
