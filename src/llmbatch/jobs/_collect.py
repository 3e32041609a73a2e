"""Collecting: finished batches polled, their result files downloaded, every row sorted into an
`Outcome` (succeeded, back to pending, failed) that the store applies in one transaction."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from .._exceptions import ProviderError
from ..pricing import Tariff
from ..providers import RemoteBatch, RemoteStatus
from ._cache import remember
from ._context import RunContext
from ._export import error_line
from ._records import Chunk, ChunkRow, Failure, Outcome, Result, ResultRef, Success
from ._verify import digest, result_file_name

__all__ = ["classify", "collect", "delete_upload", "is_retryable_status", "poll", "release_uploads"]

log = logging.getLogger("llmbatch.jobs")

#: Row error codes that say the row never ran to its end, whatever their HTTP status.
_RETRYABLE_CODES = {"batch_expired", "batch_cancelled"}
#: Batch-level error codes meaning "the quota is full", not "these rows are bad".
_QUOTA_CODES = {"token_limit_exceeded"}


def is_retryable_status(status: int) -> bool:
    """429, 408, 409 and 5xx are worth another attempt; any other 4xx is the request's fault."""
    return status in (408, 409, 429) or status >= 500


def _success(tariff: Tariff, idx: int, line: Result, rec: dict[str, Any]) -> Success | None:
    """A 2xx output record as a `Success`, priced by `tariff` from its usage; None for any other."""
    response = rec.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    if rec.get("error") is not None or not isinstance(status, int) or not 200 <= status < 300:
        return None
    body = response.get("body") or {}
    u = body.get("usage") or {} if isinstance(body, dict) else {}
    inp = u.get("prompt_tokens", u.get("input_tokens", 0)) or 0
    out = u.get("completion_tokens", u.get("output_tokens", 0)) or 0
    cached = (u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}).get("cached_tokens") or 0
    details = u.get("completion_tokens_details") or u.get("output_tokens_details") or {}
    reasoning = details.get("reasoning_tokens") or 0
    return Success(line, inp, out, cached, reasoning, tariff(inp, out, cached), idx)


def classify(outcome: Outcome, tariff: Tariff, idx: int, attempts: int, line: Result, rec: dict[str, Any]) -> None:
    """Sorts one answered row (its output record `rec`) into `outcome`: succeeded (priced by
    `tariff`), failed for good, or retried while it has attempts left."""
    success = _success(tariff, idx, line, rec)
    if success is not None:
        outcome.succeeded.append(success)
        return
    response = rec.get("response") or {}
    error = rec.get("error")
    status = response.get("status_code") if isinstance(response, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or "error"
        message = f"{code}: {error.get('message')}"
        if code in _RETRYABLE_CODES or code != "invalid_request":
            outcome.give_up_or_retry(idx, attempts, line, message, cut_off=code == "batch_cancelled")
        else:
            outcome.failed.append(Failure(line, message, idx))
        return
    body = response.get("body") if isinstance(response, dict) else None
    err = body.get("error") if isinstance(body, dict) else None
    detail = err.get("message") if isinstance(err, dict) else None
    message = f"HTTP {status}: {detail or 'error'}"
    if isinstance(status, int) and not is_retryable_status(status):
        outcome.failed.append(Failure(line, message, idx))
    else:
        outcome.give_up_or_retry(idx, attempts, line, message)


async def poll(ctx: RunContext) -> bool:
    """Asks the provider about every submitted chunk and collects those that ended."""
    progressed = False
    for chunk in ctx.store.chunks(("submitted",)):
        assert chunk.batch_id is not None
        try:
            batch = await ctx.provider.get_batch(chunk.batch_id)
        except ProviderError as exc:
            ctx.say(f"chunk {chunk.tag}: polling failed: {exc}; will try again")
            continue
        completed, failed = _answered(ctx, chunk, batch)
        seen = (batch.status.value, completed, failed)
        if seen != (chunk.remote_status, chunk.remote_completed, chunk.remote_failed):
            ctx.store.update_chunk(
                chunk.id, remote_status=batch.status.value, remote_completed=completed, remote_failed=failed
            )
            progressed = True
        if batch.status.terminal:
            try:
                await collect(ctx, chunk, batch)
            except ProviderError as exc:  # the results stay remote: fetch them on a later poll
                ctx.say(f"chunk {chunk.tag}: downloading results failed: {exc}; will try again")
                continue
            progressed = True
    return progressed


def _answered(ctx: RunContext, chunk: Chunk, batch: RemoteBatch) -> tuple[int, int]:
    """(completed, failed) rows of a polled batch, for the progress display; a batch whose
    provider says nothing before it ends is noted in `ctx.progress_unknown`."""
    if batch.counts_live or batch.status.terminal:
        ctx.progress_unknown.discard(chunk.id)
        return batch.completed, batch.failed
    if batch.fraction_done is not None:  # a percentage of the chunk's rows (Together)
        ctx.progress_unknown.discard(chunk.id)
        return min(round(batch.fraction_done * chunk.rows), chunk.rows), 0
    ctx.progress_unknown.add(chunk.id)
    return 0, 0


async def collect(ctx: RunContext, chunk: Chunk, batch: RemoteBatch) -> None:
    """Downloads a finished batch's results and applies them to its rows, in one transaction."""
    store, settings = ctx.store, ctx.settings
    rows = store.chunk_rows(chunk.id)
    by_id = {r.remote_id or r.custom_id: r for r in rows}
    tariff = ctx.tariff(chunk.model)
    user_cancelled = (store.job() or {}).get("status") == "cancelled"
    outcome = Outcome(settings.max_attempts, user_cancelled=user_cancelled, cut=bool(chunk.cut))
    seen: set[int] = set()
    unkeyed: list[dict[str, Any]] = []  # result lines without a custom_id, in the order they came
    keyed = 0
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        name = result_file_name(chunk.tag, file_id)
        dest = ctx.job_dir / "results" / name
        if ctx.fetched.pop(file_id, None) != dest or not dest.exists():
            await ctx.provider.download(file_id, dest)
        # Rows keep their results as references into this file, so it must be on disk before
        # the transaction that points at it commits, and what it was then is recorded: an
        # export checks it has not been cut or changed since (`_verify`).
        size, sha256 = digest(dest, fsync=True)
        ref_file = store.result_file(f"results/{name}", size, sha256, file_id, chunk.id)
        with open(dest, "rb") as fh:
            end = 0
            for raw in fh:
                start, end = end, end + len(raw)
                line = raw.rstrip(b"\r\n")
                if not line or line.isspace():
                    continue
                try:
                    rec = orjson.loads(line)
                    cid = rec.get("custom_id")
                except (orjson.JSONDecodeError, AttributeError):
                    log.warning("chunk %s: ignoring a result line that is not a JSON object", chunk.tag)
                    continue
                if cid is None:
                    unkeyed.append(rec)
                    continue
                keyed += 1
                row = by_id.get(cid) if isinstance(cid, str) else None
                if row is None:
                    _unmatched(outcome, tariff, rec)
                    continue
                if row.idx in seen:
                    continue
                seen.add(row.idx)
                result: Result
                if rec["custom_id"] != row.custom_id:  # sent under an id the provider accepts
                    rec["custom_id"] = row.custom_id
                    result = orjson.dumps(rec)
                else:
                    result = ResultRef(ref_file, start, len(line))
                classify(outcome, tariff, row.idx, row.attempts, result, rec)
    if unkeyed:
        if ctx.provider.unkeyed_results_in_order and not keyed and len(unkeyed) == len(rows):
            # As many as the chunk's rows, in the order the provider documents: its rows' order.
            for row, rec in zip(rows, unkeyed):
                rec["custom_id"] = row.custom_id
                seen.add(row.idx)
                classify(outcome, tariff, row.idx, row.attempts, orjson.dumps(rec), rec)
            log.info("chunk %s: %d results without their ids matched to its rows by position", chunk.tag, len(rows))
        else:
            for rec in unkeyed:
                _unmatched(outcome, tariff, rec)
    u = outcome.unmatched
    if u.results:
        ctx.say(
            f"chunk {chunk.tag}: {u.results} results matched none of its rows (their rows go again); "
            f"their usage ({u.input_tokens} input + {u.output_tokens} output tokens, ${u.cost:.4f}) counts as spent"
        )
    _unanswered(ctx, chunk, batch, rows, seen, outcome)
    store.collect(chunk.id, outcome, batch.status.value)
    remember(ctx, outcome)  # after the rows' own commit: the cache only ever holds answers a job has
    if batch.status is RemoteStatus.COMPLETED:
        ctx.quota_failures = 0
    if chunk.file_id and not settings.keep_uploads and not ctx.provider.batches_known_by_upload:
        # The input is no longer needed, and uploads count against per-account file caps.
        await delete_upload(ctx, chunk.tag, chunk.file_id)


def _unmatched(outcome: Outcome, tariff: Tariff, rec: dict[str, Any]) -> None:
    """A result that matches no row of its chunk: what it generated was billed all the same."""
    success = _success(tariff, -1, b"", rec)
    if success is not None:
        outcome.unmatched.add(success)


async def release_uploads(ctx: RunContext) -> None:
    """Deletes, once the job has finished, the uploads that were kept because they are what tells
    its batches apart (`Provider.batches_known_by_upload`), unless `--keep-uploads`."""
    if ctx.settings.keep_uploads or not ctx.provider.batches_known_by_upload:
        return
    for chunk in ctx.store.chunks(("collected",)):
        if chunk.file_id and await delete_upload(ctx, chunk.tag, chunk.file_id):
            ctx.store.update_chunk(chunk.id, file_id=None)


async def delete_upload(ctx: RunContext, tag: str, file_id: str) -> bool:
    try:
        await ctx.provider.delete_file(file_id)
    except ProviderError as exc:
        if exc.status != 404:
            log.warning("chunk %s: could not delete its upload %s: %s", tag, file_id, exc)
            return False
    return True


def _unanswered(
    ctx: RunContext, chunk: Chunk, batch: RemoteBatch, rows: list[ChunkRow], seen: set[int], outcome: Outcome
) -> None:
    """Rows the provider said nothing about: a failed batch names bad lines; others are retried."""
    line_errors = {e.get("line"): e for e in batch.errors if isinstance(e.get("line"), int)}
    general = "; ".join(e.get("message") or "" for e in batch.errors if not isinstance(e.get("line"), int))
    # A batch refused because the provider's enqueued-token quota was full (Azure) says
    # nothing about its rows: they go back without using up an attempt, after a pause.
    quota_full = bool(batch.errors) and all(e.get("code") in _QUOTA_CODES for e in batch.errors)
    if quota_full:
        backoff = min(max(ctx.settings.poll_interval, 1.0) * 2**ctx.quota_failures, 900.0)
        ctx.quota_failures += 1
        ctx.quota_wait_until = ctx.clock() + backoff
        ctx.say(f"chunk {chunk.tag}: the provider's token quota is full ({general}); sending again in {backoff:.0f} s")
    # Rows cut off by the user's own `llmbatch cancel` were never really tried: they go back
    # to pending with their attempt refunded (`Outcome.user_cancelled`), so a resume runs them
    # whatever --max-attempts.
    cancelled = batch.status is RemoteStatus.CANCELLED
    for n, row in enumerate(rows, start=1):
        if row.idx in seen:
            continue
        if n in line_errors:
            e = line_errors[n]
            message = f"rejected by the provider: {e.get('code')}: {e.get('message')}"
            code = e.get("code") or "invalid_request"
            outcome.failed.append(Failure(error_line(row.custom_id, code, message), message, row.idx))
            continue
        reason = general or f"no result for this row in batch {batch.id} ({batch.status.value})"
        if cancelled:  # cut off: refunded when the user cancelled
            reason = f"batch_cancelled: {reason}"
        elif batch.status is RemoteStatus.EXPIRED:
            reason = f"batch_expired: {reason}"
        outcome.give_up_or_retry(
            row.idx, row.attempts, error_line(row.custom_id, "missing_result", reason), reason,
            cut_off=cancelled, refund=quota_full,
        )  # fmt: skip
