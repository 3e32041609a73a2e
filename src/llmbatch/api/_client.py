"""Batching clients: ordinary `openai`-style calls, sent as batch jobs behind the caller's back.

    client = AsyncBatchClient("my-eval", provider="openai")
    answers = await asyncio.gather(*(
        client.chat.completions.create(model="gpt-4o-mini", messages=[...]) for item in items
    ))

Each call becomes a row of a durable job (the same job store as `llmbatch run`), keyed by a hash
of its request and of how many identical requests came before it in this program. Calls wait
in the job until a batch forms: when `size` calls are waiting, when the batch's bytes reach the
provider's cap, or when the oldest waiting call has waited `send_delay` seconds; `tick` paces
these checks and `max_batches` bounds the batches in flight. Finished rows resolve their
awaitables with the SDK's own response types (`ChatCompletion`, `CreateEmbeddingResponse`);
failed rows raise the SDK's own errors (`BadRequestError`, `RateLimitError`, ...). Running the
same program again, after a crash, Ctrl+C or on purpose, answers finished calls from the store
without sending them and picks up batches still in flight instead of creating new ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import orjson
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ValidationError

from .._exceptions import BudgetExceeded, ConfigError, LLMBatchError
from .._rows import request_key
from ..jobs import (
    IN_FLIGHT,
    JobSession,
    JobSettings,
    RequestRow,
    ResultReader,
    RowRules,
    default_job_root,
    provider_started,
)
from ..providers import split_model
from ._errors import python_names

__all__ = ["AsyncBatchClient", "BatchClient", "BatchConfig"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


@dataclass(frozen=True)
class BatchConfig:
    """When calls are sent as a batch.

    A batch is sent as soon as `size` calls of one model are waiting, or their bytes reach
    `max_bytes`, or the oldest waiting call has waited `send_delay` seconds. `tick` is how often
    these triggers are checked; `max_batches` bounds the batches in flight (more calls wait).
    None means the provider's own limit (e.g. OpenAI: 50,000 requests, 200 MB, 20 batches).
    """

    size: int = 1000
    send_delay: float = 2.0
    tick: float = 0.05
    max_batches: int | None = None
    max_bytes: int | None = None
    #: First wait between polls of batches in flight (it grows while nothing changes).
    poll_interval: float = 1.0
    max_poll_interval: float = 30.0

    def __post_init__(self) -> None:
        if self.size < 1 or self.send_delay < 0 or self.tick <= 0 or self.poll_interval <= 0:
            raise ConfigError("BatchConfig: size must be >= 1, send_delay >= 0, tick and poll_interval > 0")


_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def _sdk_error(endpoint: str, line: dict[str, Any] | None, fallback: str) -> openai.APIError:
    """The SDK's own exception for a row that finally failed."""
    request = httpx.Request("POST", f"https://llmbatch.invalid{endpoint}")
    response = (line or {}).get("response")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        message = (err.get("message") if isinstance(err, dict) else None) or f"HTTP {status}"
        cls = _STATUS_ERRORS.get(status) or (openai.InternalServerError if status >= 500 else openai.APIStatusError)
        return cls(message, response=httpx.Response(status, request=request), body=body)
    err = (line or {}).get("error")
    message = f"{err.get('code')}: {err.get('message')}" if isinstance(err, dict) else fallback
    return openai.APIError(message, request, body=err)


def _parse(model: type[M], body: Any) -> M:
    try:
        return model.model_validate(body)
    except ValidationError:  # a provider's body with a field the SDK types do not expect
        return model.model_construct(**body) if isinstance(body, dict) else model.model_construct()


class _Call:
    """One waiting call: its row id and the future its caller awaits."""

    __slots__ = ("custom_id", "endpoint", "raw", "future")

    def __init__(self, custom_id: str, endpoint: str, raw: bytes, future: asyncio.Future[dict[str, Any]]) -> None:
        self.custom_id = custom_id
        self.endpoint = endpoint
        self.raw = raw
        self.future = future


class AsyncBatchClient:
    """An `openai.AsyncOpenAI` look-alike whose calls are sent as batch jobs.

    `job` names the job (its store lives under `job_dir`, default `$LLMBATCH_HOME/jobs`, as
    `api-<job>`): the same name in a later run reuses its finished results and its batches in
    flight. `provider` is any provider `llmbatch run` supports (default `local`, an in-process
    llmbatch server running `engine`: "auto" is the packaged local model when installed, else
    echo); `base_url` and `api_key` default to the provider's environment variables. `max_cost`
    (USD) holds back batches whose estimate would pass it: calls that cannot be sent then raise
    `llmbatch.BudgetExceeded`. `max_attempts` bounds the tries of a call that fails retryably
    (429, 5xx, expired batches). `direct_below` sends the calls waiting when a batch would be
    sent through the provider's direct API instead, when there are no more than that many (at
    direct prices; 0: always batch).

    One client runs a job at a time (the job's lock, as `llmbatch run` takes it): another
    client with the same job name, here or in another process, raises `llmbatch.JobBusy`
    until this one is closed.

    Covered calls: `chat.completions.create(...)` and `embeddings.create(...)`, with the SDK's
    keyword arguments. Use it as `async with AsyncBatchClient(...) as client:` or call
    `await client.aclose()` when done.
    """

    def __init__(
        self,
        job: str = "default",
        *,
        provider: str = "local",
        base_url: str | None = None,
        api_key: str | None = None,
        engine: str = "auto",
        config: BatchConfig | None = None,
        max_cost: float | None = None,
        max_attempts: int = 3,
        job_dir: Path | str | None = None,
        api_version: str | None = None,
        direct_below: int = 0,
    ) -> None:
        self.config = config or BatchConfig()
        self.settings = JobSettings(
            provider=provider,
            base_url=base_url,
            engine=engine,
            api_version=api_version,
            batch_size=self.config.size,
            max_bytes=self.config.max_bytes,
            max_in_flight=self.config.max_batches,
            max_attempts=max_attempts,
            max_cost=max_cost,
            poll_interval=self.config.poll_interval,
            max_poll_interval=self.config.max_poll_interval,
            direct_below=direct_below,
        )
        self.job_id = f"api-{job}"
        try:
            self._session = JobSession.named(
                self.job_id, self.settings, Path(job_dir or default_job_root()), api_key=api_key, say=self._say
            )
        except LLMBatchError as exc:
            raise python_names(exc) from None
        try:
            self._session.lock.acquire()
        except BaseException:
            self._session.close()
            raise
        self.job_dir = self._session.dir
        self.store = self._session.store
        self._runner = self._session.calls_runner(self.settings)
        self._rules = RowRules.of(self.settings)
        self._seen: Counter[str] = Counter()
        self._new: list[_Call] = []
        self._waiting: dict[str, _Call] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._oldest_pending: float | None = None
        self.chat = _Chat(self)
        self.embeddings = _Embeddings(self)
        #: Messages the runner would print (retries, budget holds), newest last.
        self.log: list[str] = []

    def _say(self, message: str) -> None:
        self.log.append(message)

    async def __aenter__(self) -> AsyncBatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- calls ---------------------------------------------------------------------------

    async def _request(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Queues one request; returns its result line once its batch is collected."""
        body = {k: v for k, v in body.items() if v is not None}
        if body.get("stream"):
            raise ConfigError("stream=True cannot be batched")
        key = request_key(endpoint, body).hex()
        custom_id = f"{key}-{self._seen[key]}"  # the n-th identical call of this program
        self._seen[key] += 1
        raw = orjson.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body})
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._new.append(_Call(custom_id, endpoint, raw, future))
        self._ensure_running()
        assert self._wake is not None
        self._wake.set()
        return await future

    def _ensure_running(self) -> None:
        if self._closing:
            raise ConfigError("the client is closed")
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    # -- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._wake is not None
        async with provider_started(self._runner.ctx.provider):
            try:
                await self._runner.start()
                first, longest = self._runner.poll_waits()
                next_poll, interval = 0.0, first
                while True:
                    self._admit()
                    send_now = self._plan()
                    now = time.monotonic()
                    due = now >= next_poll and bool(self.store.chunks(("submitted",)))
                    progressed = await self._runner.round(full_only=True, poll=due, direct=send_now)
                    if due:
                        interval = first if progressed else min(interval * 1.5, longest)
                        next_poll = now + interval
                    self._resolve()
                    if self._closing and not self._waiting and not self._new:
                        return
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.config.tick)
                    except TimeoutError:
                        pass
            except BaseException as exc:  # a fatal error (bad key, refused batch): every caller hears it
                python_names(exc)
                for call in [*self._new, *self._waiting.values()]:
                    if not call.future.done():
                        call.future.set_exception(exc if isinstance(exc, Exception) else ConfigError(str(exc)))
                self._new.clear()
                self._waiting.clear()
                raise

    def _admit(self) -> None:
        """Moves newly queued calls into the job store (or straight to their stored outcome)."""
        if not self._new:
            return
        calls, self._new = self._new, []
        known = self.store.known_ids([c.custom_id for c in calls])
        rows = []
        idx = self.store.next_idx()
        for call in calls:
            self._waiting[call.custom_id] = call
            if call.custom_id in known:
                continue  # asked before (an earlier run): finished, or in flight, or pending
            checked = self._rules.check(call.raw)
            if checked.state == "invalid":
                del self._waiting[call.custom_id]
                call.future.set_exception(
                    openai.BadRequestError(
                        f"invalid request: {checked.error}",
                        response=httpx.Response(400, request=httpx.Request("POST", "https://llmbatch.invalid")),
                        body={"error": {"message": checked.error, "type": "invalid_request_error"}},
                    )
                )
                continue
            rows.append(RequestRow(idx, checked, call.raw))
            idx += 1
        if rows:
            self.store.add_requests(rows)
            if self._oldest_pending is None:
                self._oldest_pending = time.monotonic()

    def _plan(self) -> bool:
        """Forms batches from waiting calls when a trigger fires (size, bytes, send delay);
        returns whether the waiting calls are to be sent now, whatever their number."""
        if not self.store.pending_count():
            self._oldest_pending = None
            return False
        now = time.monotonic()
        if self._oldest_pending is None:  # rows back from a failed attempt, or from an earlier run
            self._oldest_pending = now - self.config.send_delay
        if self._closing or now - self._oldest_pending >= self.config.send_delay:
            self._runner.plan()  # (none when `direct_below` sends them instead)
            self._oldest_pending = None
            return True
        self._runner.plan(full_only=True)
        return False

    def _resolve(self) -> None:
        """Hands finished rows to their callers."""
        if not self._waiting:
            return
        outcomes = self.store.outcomes(list(self._waiting))
        if outcomes:
            with ResultReader(self.store) as reader:
                for cid, state, result, error in outcomes:
                    call = self._waiting.pop(cid)
                    line = orjson.loads(reader.line(result)) if result is not None else None
                    if call.future.done():
                        continue
                    if state == "succeeded" and line is not None:
                        call.future.set_result(line)
                    else:
                        call.future.set_exception(_sdk_error(call.endpoint, line, error or "failed"))
        if self._runner.budget_blocked and not self.store.chunks(("uploading", "uploaded", "creating", "submitted")):
            pending = self.store.unfinished_ids()
            for cid in [c for c in self._waiting if c in pending]:
                call = self._waiting.pop(cid)
                if not call.future.done():
                    call.future.set_exception(
                        BudgetExceeded(f"not sent: the next batch would pass max_cost ${self.settings.max_cost:.2f}")
                    )

    async def aclose(self) -> None:
        """Sends what is still waiting, waits for every outstanding call, then stops."""
        self._closing = True
        try:
            if self._task is not None:
                assert self._wake is not None
                self._wake.set()
                try:
                    await self._task
                finally:
                    self._task = None
            if not self.store.pending_count() and not self.store.chunks(("planned", *IN_FLIGHT)):
                self.store.set_job(status="finished")  # every call answered: not listed as running
        finally:
            self._session.lock.release()
            self._session.close()


class _Completions:
    def __init__(self, client: AsyncBatchClient) -> None:
        self._client = client

    async def create(self, *, model: str, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        """Like `AsyncOpenAI().chat.completions.create`, answered from a batch."""
        body = {"model": _bare(model, self._client), "messages": messages, **params}
        line = await self._client._request(CHAT, body)
        return _parse(ChatCompletion, line["response"]["body"])


class _Chat:
    def __init__(self, client: AsyncBatchClient) -> None:
        self.completions = _Completions(client)


class _Embeddings:
    def __init__(self, client: AsyncBatchClient) -> None:
        self._client = client

    async def create(self, *, model: str, input: Any, **params: Any) -> CreateEmbeddingResponse:
        """Like `AsyncOpenAI().embeddings.create`, answered from a batch."""
        body = {"model": _bare(model, self._client), "input": input, **params}
        line = await self._client._request(EMBEDDINGS, body)
        return _parse(CreateEmbeddingResponse, line["response"]["body"])


def _bare(model: str, client: AsyncBatchClient) -> str:
    return split_model(model, client.settings.provider)[1]


# -- the sync facade ---------------------------------------------------------------------


class BatchClient:
    """The blocking facade of `AsyncBatchClient`, for scripts (same arguments).

    `chat.completions.create(...)` blocks until its batch is back, like the SDK's sync client:
    call it from many threads (a `ThreadPoolExecutor`) so calls can share batches, or use
    `chat.completions.submit(...)`, which returns a `concurrent.futures.Future` at once.
    Close it (or use `with BatchClient(...) as client:`) to send the last calls and stop.
    """

    def __init__(self, job: str = "default", **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmbatch-client", daemon=True)
        self._thread.start()
        self._async = self._call(self._make(job, kwargs))
        self.chat = _SyncChat(self)
        self.embeddings = _SyncEmbeddings(self)

    @staticmethod
    async def _make(job: str, kwargs: dict[str, Any]) -> AsyncBatchClient:
        return AsyncBatchClient(job, **kwargs)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> cf.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._submit(coro).result()

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Sends what is still waiting, waits for every outstanding call, then stops the loop."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._async.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


class _SyncMethod:
    def __init__(self, owner: BatchClient, fn: Callable[..., Awaitable[Any]]) -> None:
        self._owner = owner
        self._fn = fn

    def create(self, **params: Any) -> Any:
        """Blocks until the call's batch is back; returns what the SDK's sync client would."""
        return self._owner._call(self._fn(**params))

    def submit(self, **params: Any) -> cf.Future[Any]:
        """Queues the call and returns a `concurrent.futures.Future` of its response."""
        return self._owner._submit(self._fn(**params))


class _SyncChat:
    def __init__(self, owner: BatchClient) -> None:
        self.completions = _SyncMethod(owner, lambda **p: owner._async.chat.completions.create(**p))


class _SyncEmbeddings(_SyncMethod):
    def __init__(self, owner: BatchClient) -> None:
        super().__init__(owner, lambda **p: owner._async.embeddings.create(**p))
