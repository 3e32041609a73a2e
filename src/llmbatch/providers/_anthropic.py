"""Anthropic's Message Batches API, through the official `anthropic` SDK (`pip install "llmbatch[anthropic]"`).

Rows are OpenAI chat completion requests; `_anthropic_translate` turns each into Messages API
params and each result back into an OpenAI batch output line (the Anthropic result kept
under `"native"`).

Anthropic has no file uploads: a batch is created with its requests inline. `upload`
therefore translates the chunk into a local file next to it, `TAG.anthropic.jsonl`, which is
the create request's body with one `{"custom_id", "params"}` request per line, and returns
`"local:" + its path`. `create_batch` sends that body as one `POST /v1/messages/batches` (at
most 100,000 requests and 256 MB) without SDK retries, so that an answer lost after the batch
was made is settled by `find_batch` rather than by a second batch; once answered, the file is
deleted. `find_upload` finds nothing: uploading again only rewrites the local file.

Statuses: `in_progress` is in progress, `canceling` cancelling, and `ended` is cancelled when a
cancel was asked for, else completed: requests that expired come back as `batch_expired`
lines, which the runner retries. The results stream (the batch id is its `output_file_id`)
is read line by line.

Reconciliation without metadata: Anthropic batches carry no metadata or name, so after a crash
between creating a batch and recording it, a chunk's batch has to be recognised otherwise.
1. A journal, `anthropic-batches.jsonl` next to the chunk files, records each batch this
   adapter created or adopted as soon as the API answers: a chunk found there is settled,
   and the batches it names are never candidates for another chunk.
2. Otherwise the batches created since the chunk's intent are listed, newest first; the
   candidates are those with as many requests as the chunk. An ended candidate is read: it is
   the chunk's when every result's custom_id is one of the chunk's, and nobody's otherwise.
3. With no verified candidate: none at all means there is no batch (the runner creates it).
   Exactly one unverifiable candidate (still processing) is adopted, unless another chunk of
   the job with as many requests also tried a create lately and has no batch recorded:
   adopting a stranger's batch loses nothing (its results do not match, and the runner
   retries those rows), while creating a second batch could pay twice. Anything else raises a
   retryable `ProviderError`: the runner asks again later, once the candidates have ended and
   can be read.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import orjson
from anthropic.types.messages import MessageBatch

from .._exceptions import ConfigError, ProviderError
from ._anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    Untranslatable,
    chat_completion_of,
    error_body,
    openai_line,
    to_messages_params,
    translate_request,
)
from ._base import TAG_KEY, Provider, ProviderLimits, RemoteBatch, RemoteStatus

__all__ = ["ANTHROPIC_LIMITS", "AnthropicBatchProvider"]

T = TypeVar("T")

#: Anthropic's batch limits: 100,000 requests or 256 MB per batch, counted on the create
#: request's body. Translation grows a row (every message becomes a content-block array:
#: 1.4-1.8x in practice), so chunks are planned on each row's translated size (`check_and_measure`).
MAX_BODY_BYTES = 256_000_000
ANTHROPIC_LIMITS = ProviderLimits(max_requests=100_000, max_bytes=MAX_BODY_BYTES, max_in_flight=10)

LOCAL = "local:"
JOURNAL = "anthropic-batches.jsonl"
_SUFFIX = ".anthropic.jsonl"
#: A candidate batch's results, read while finding out whether it is the chunk's, kept for `download`.
_RESULTS_SUFFIX = ".anthropic-results.jsonl"
#: The create body around its requests: `{"requests":[` and a newline before them, a newline
#: and `]}` and a newline after; each request takes its line and a `,\n`, less one for the last.
_OPEN, _CLOSE = b'{"requests":[\n', b"\n]}\n"


def _unix(value: Any) -> int:
    return int(value.timestamp()) if value is not None else 0


def _remote(b: MessageBatch) -> RemoteBatch:
    c = b.request_counts
    ended = b.processing_status == "ended"
    if b.processing_status == "in_progress":
        status = RemoteStatus.IN_PROGRESS
    elif b.processing_status == "canceling":
        status = RemoteStatus.CANCELLING
    else:
        status = RemoteStatus.CANCELLED if b.cancel_initiated_at is not None else RemoteStatus.COMPLETED
    return RemoteBatch(
        id=b.id,
        status=status,
        output_file_id=b.id if ended else None,
        total=c.processing + c.succeeded + c.errored + c.canceled + c.expired,
        completed=c.succeeded,
        failed=c.errored + c.canceled + c.expired,
        # Anthropic documents its requests as `processing` until the whole batch ends: counts
        # that have not moved say nothing (progress unknown until the end), ones that have are real.
        counts_live=c.succeeded + c.errored + c.canceled + c.expired > 0,
        created_at=_unix(b.created_at),
    )


def _total(b: MessageBatch) -> int:
    c = b.request_counts
    return c.processing + c.succeeded + c.errored + c.canceled + c.expired


def _local_path(file_id: str | None) -> Path:
    if not file_id or not file_id.startswith(LOCAL):
        raise ProviderError(f"not a translated chunk of the anthropic provider: {file_id!r}", status=400)
    return Path(file_id[len(LOCAL) :])


def _read_journal(folder: Path) -> dict[str, str]:
    """tag -> batch id of every batch recorded in the folder's journal (a torn last line is skipped)."""
    found: dict[str, str] = {}
    try:
        with open(folder / JOURNAL, "rb") as fh:
            for line in fh:
                try:
                    rec = orjson.loads(line)
                    found[rec["tag"]] = rec["batch_id"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    return found


def _write_journal(folder: Path, tag: str, batch_id: str) -> None:
    with open(folder / JOURNAL, "ab") as fh:
        fh.write(b"\n" + orjson.dumps({"tag": tag, "batch_id": batch_id}) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def _custom_ids(path: Path) -> list[str]:
    """The custom_ids of a translated chunk (a create body holding one request per line)."""
    ids = []
    with open(path, "rb") as fh:
        for line in fh:
            line = line.strip().rstrip(b",")
            if line.startswith(b'{"custom_id"'):  # not the opening `{"requests":[`
                ids.append(orjson.loads(line)["custom_id"])
    return ids


def _request_line(custom_id: str, params: dict[str, Any]) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "params": params})


def _count_requests(path: Path) -> int:
    n = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            n += block.count(b"\n")
    return n - 2  # the body's opening and closing lines


class AnthropicBatchProvider(Provider):
    """Anthropic's Message Batches API at `base_url` (default https://api.anthropic.com)."""

    name = "anthropic"
    key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    default_base_url = "https://api.anthropic.com"
    endpoints = frozenset({"/v1/chat/completions"})
    custom_id_pattern = re.compile(r"[a-zA-Z0-9_-]{1,64}")
    default_max_tokens = DEFAULT_MAX_TOKENS
    wire_envelope = len(_OPEN) + len(_CLOSE) - 2

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
        self.limits = limits or ANTHROPIC_LIMITS
        self._client = anthropic.AsyncAnthropic(
            api_key=key, base_url=self.base_url, max_retries=max_retries, timeout=timeout
        )
        #: batch id -> its results, read (as OpenAI lines) by `find_batch`: downloaded once, not twice.
        self._fetched: dict[str, Path] = {}

    @classmethod
    def check_request(cls, endpoint: str, body: dict[str, Any]) -> list[str]:
        reasons = super().check_request(endpoint, body)
        return reasons or translate_request(body)[1]

    @classmethod
    def check_and_measure(cls, custom_id: str, endpoint: str, body: dict[str, Any]) -> tuple[list[str], int | None]:
        """Translated once: the reasons, and the request's line in the create body (as `upload`
        writes it) with its `,\n`."""
        reasons = super().check_request(endpoint, body)
        if reasons:
            return reasons, None
        params, reasons = translate_request(body)
        return reasons, None if reasons else len(_request_line(custom_id, params)) + 2

    async def aclose(self) -> None:
        await self._client.close()

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Runs an SDK call, translating its errors once, here at the boundary."""
        try:
            return await fn()
        except anthropic.APIStatusError as exc:
            err = error_body(exc.body, exc.message)["error"]
            raise ProviderError(
                f"{what} failed: HTTP {exc.status_code} {err['type']}: {err['message']}",
                status=exc.status_code,
                body=exc.body,
            ) from exc
        except anthropic.APIConnectionError as exc:
            raise ProviderError(f"{what} failed: cannot reach {self.base_url}: {exc}") from exc
        except anthropic.AnthropicError as exc:  # e.g. results asked of a batch still processing
            raise ProviderError(f"{what} failed: {exc}") from exc

    # -- submitting ----------------------------------------------------------------------

    async def upload(self, tag: str, path: Path) -> str:
        dest = path.with_name(tag + _SUFFIX)
        tmp = dest.with_name(dest.name + ".part")
        # The file is the create request's body, one request per line, so that create_batch
        # sends it as read and find_batch can read the custom_ids back line by line.
        n = 0
        with open(path, "rb") as src, open(tmp, "wb") as out:
            out.write(_OPEN)
            for raw in src:
                if not raw.strip():
                    continue
                rec = orjson.loads(raw)
                try:
                    params = to_messages_params(rec["body"])
                except Untranslatable as exc:  # check_request refuses these at ingest
                    raise ProviderError(
                        f"row {rec.get('custom_id')} cannot go to Anthropic: {exc}", status=400
                    ) from exc
                out.write((b",\n" if n else b"") + _request_line(rec["custom_id"], params))
                n += 1
            out.write(_CLOSE)
            size = out.tell()
        if size > MAX_BODY_BYTES:
            tmp.unlink(missing_ok=True)
            raise ProviderError(
                f"chunk {tag} is too large: {size:,} bytes once translated, past Anthropic's "
                f"{MAX_BODY_BYTES:,} per batch",
                status=413,
            )
        os.replace(tmp, dest)
        return LOCAL + str(dest)

    async def find_upload(self, tag: str, since: int) -> str | None:
        return None  # nothing leaves this machine before create_batch: uploading again is harmless

    async def create_batch(
        self, tag: str, job: str, file_id: str, endpoint: str, completion_window: str = "24h"
    ) -> RemoteBatch:
        if endpoint not in self.endpoints:
            raise ConfigError(f"the {self.name} provider cannot batch {endpoint}")
        if completion_window != "24h":
            raise ConfigError(f"Anthropic batches have a fixed 24h window, not {completion_window}")
        path = _local_path(file_id)
        try:
            body = path.read_bytes()
            os.utime(path)  # when a create was last tried: find_batch weighs only recent rivals
        except FileNotFoundError:
            raise ProviderError(f"chunk {tag}: its translated requests ({path}) are gone", status=410) from None
        # No SDK retries: an answer lost after the batch was made is settled by find_batch, not a second batch.
        b = await self._call(
            "creating a batch",
            lambda: self._client.post(
                "/v1/messages/batches", content=body, cast_to=MessageBatch, options={"max_retries": 0}
            ),
        )
        _write_journal(path.parent, tag, b.id)
        path.unlink(missing_ok=True)
        return _remote(b)

    # -- finding a batch after a crash -----------------------------------------------------

    async def find_batch(self, tag: str, since: int, file_id: str | None = None) -> RemoteBatch | None:
        path = _local_path(file_id)
        journal = _read_journal(path.parent)
        cache = path.with_name(tag + _RESULTS_SUFFIX)
        if tag in journal:
            path.unlink(missing_ok=True)  # a crash between the journal entry and this cleanup
            cache.unlink(missing_ok=True)
            return await self.get_batch(journal[tag])
        try:
            ids = set(_custom_ids(path))
            tried = path.stat().st_mtime  # when a create was last tried (create_batch touches it)
        except FileNotFoundError:
            raise ProviderError(
                f"chunk {tag}: cannot look for its batch, its requests ({path}) are gone", status=410
            ) from None
        taken = set(journal.values())
        candidates: list[MessageBatch] = []

        async def scan() -> None:
            async for b in self._client.messages.batches.list(limit=100):
                if _unix(b.created_at) < since:
                    return  # newest first: nothing older can be ours
                if b.id not in taken and _total(b) == len(ids):
                    candidates.append(b)

        await self._call("listing batches", scan)
        # The chunk's batch was made moments after its create was sent: the candidate made
        # nearest that time is read first, so that others' results are read only when it is
        # not the chunk's. The one that proves ours is kept, for `download`.
        candidates.sort(key=lambda b: abs(b.created_at.timestamp() - tried))
        verified: MessageBatch | None = None
        unverifiable: list[MessageBatch] = []
        for b in candidates:
            if b.processing_status != "ended":
                unverifiable.append(b)
                continue
            held = await self._call(f"reading the results of {b.id}", lambda b=b: self._holds(b, ids, cache))
            if held:
                verified = b
                self._fetched[b.id] = cache
                break
            if held is None:
                unverifiable.append(b)
        found = verified
        if found is None and unverifiable:
            rivals = self._rivals(path, tag, len(ids), journal, since)
            if len(unverifiable) > 1 or rivals:
                raise ProviderError(
                    f"chunk {tag}: cannot tell yet which of {len(unverifiable)} processing batches of "
                    f"{len(ids)} requests is its own ({rivals} other chunks of that size wait for theirs); "
                    "will look again once they end",
                    status=503,
                )
            found = unverifiable[0]
        if found is None:
            return None
        _write_journal(path.parent, tag, found.id)
        path.unlink(missing_ok=True)
        return _remote(found)

    async def _holds(self, b: MessageBatch, ids: set[str], dest: Path) -> bool | None:
        """Whether an ended batch's results are all `ids`' (None: its results cannot be read).
        Reading stops at the first result that is not; when all are, they are in `dest` as
        `download` writes them."""
        created = int(time.time())
        tmp = dest.with_name(dest.name + ".part")
        try:
            async with self._client.messages.batches.with_streaming_response.results(b.id) as resp:
                seen = False
                with open(tmp, "wb") as out:
                    async for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        rec = orjson.loads(line)
                        if rec.get("custom_id") not in ids:
                            return False
                        out.write(orjson.dumps(openai_line(rec, created)) + b"\n")
                        seen = True
            if seen:
                os.replace(tmp, dest)
            return seen
        except anthropic.APIConnectionError:
            raise
        except (anthropic.AnthropicError, orjson.JSONDecodeError):  # gone (archived), or not readable
            return None
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _rivals(path: Path, tag: str, n: int, journal: dict[str, str], since: int) -> int:
        """Other chunks of the job with `n` requests, no batch recorded, and a create tried since `since`."""
        count = 0
        for other in path.parent.glob("*" + _SUFFIX):
            other_tag = other.name[: -len(_SUFFIX)]
            if other_tag == tag or other_tag in journal or other.stat().st_mtime < since:
                continue  # (an old file is a chunk re-planned away, never sent)
            if _count_requests(other) == n:
                count += 1
        return count

    # -- the run-start audit ---------------------------------------------------------------

    async def list_job_batches(
        self, job_id: str, since: int, chunks_dir: Path | None = None
    ) -> list[RemoteBatch] | None:
        """The job's batches that its journal names (in `chunks_dir`, beside the job store, so a
        store damaged or rolled back on its own leaves it intact), from one listing.

        Batches carry no tag or metadata, so the journal is the only sound record: results'
        custom_ids are no proof, as another job may send the same ids. A journal restored
        together with the store from an older copy lacks the batches made since; those cannot
        be recognised and their rows are sent again. A batch's rows are read from its results
        once it ends (the audit waits for one still processing).
        """
        if chunks_dir is None:
            return None
        journal = {b: tag for tag, b in _read_journal(chunks_dir).items() if tag.startswith(f"{job_id}-c")}
        if not journal:
            return []  # nothing created yet: nothing to list
        found: list[RemoteBatch] = []

        async def scan() -> None:
            async for b in self._client.messages.batches.list(limit=1000):
                if _unix(b.created_at) < since:
                    return  # newest first: nothing older is the job's
                if b.id in journal:
                    remote = _remote(b)
                    remote.metadata[TAG_KEY] = journal[b.id]
                    found.append(remote)

        await self._call("listing batches", scan)
        return found

    # -- polling, results, cancelling ------------------------------------------------------

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        b = await self._call("polling a batch", lambda: self._client.messages.batches.retrieve(batch_id))
        return _remote(b)

    async def download(self, file_id: str, dest: Path) -> None:
        fetched = self._fetched.pop(file_id, None)
        if fetched is not None and fetched.exists():
            shutil.move(fetched, dest)  # an ended batch's results do not change
            return
        created = int(time.time())

        async def fetch() -> None:
            tmp = dest.with_name(dest.name + ".part")
            async with self._client.messages.batches.with_streaming_response.results(file_id) as resp:
                with open(tmp, "wb") as out:
                    async for line in resp.iter_lines():
                        if line.strip():
                            out.write(orjson.dumps(openai_line(orjson.loads(line), created)) + b"\n")
            os.replace(tmp, dest)

        await self._call(f"downloading the results of {file_id}", fetch)

    async def cancel(self, batch_id: str) -> RemoteBatch:
        return _remote(await self._call("cancelling a batch", lambda: self._client.messages.batches.cancel(batch_id)))

    async def delete_file(self, file_id: str) -> None:
        if file_id.startswith(LOCAL):
            _local_path(file_id).unlink(missing_ok=True)

    # -- the direct API ------------------------------------------------------------------

    async def direct(self, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        if endpoint not in self.endpoints:
            return 404, error_body({"error": {"type": "not_found_error", "message": f"{endpoint} is not translated"}})
        try:
            params = to_messages_params(body)
        except Untranslatable as exc:
            return 400, error_body({"error": {"type": "invalid_request_error", "message": str(exc)}})
        model, max_tokens, messages = params.pop("model"), params.pop("max_tokens"), params.pop("messages")
        try:
            # The rest goes as extra body fields: the SDK's typed arguments lag the API (temperature, ...).
            message = await self._client.messages.create(
                model=model, max_tokens=max_tokens, messages=messages, extra_body=params or None
            )
        except anthropic.APIStatusError as exc:
            return exc.status_code, error_body(exc.body, exc.message)
        except anthropic.APIConnectionError as exc:
            return 502, {"error": {"message": f"cannot reach {self.base_url}: {exc}", "type": "connection_error"}}
        return 200, chat_completion_of(message.to_dict())
