"""Submitting: each planned chunk uploaded and created as a remote batch at most once.

Intent (`uploading`, `creating`) is recorded before each remote call, and the upload and the
batch carry the chunk's tag, so a chunk caught between intent and result by a crash (or an
unanswered call) is looked up by its tag (`reconcile`) before anything is created again.

A chunk no batch can hold is re-planned (its rows planned again into new chunks, under new
tags): one over the run's limits (smaller than when it was planned) whose create was never
asked for, and one whose upload or create the provider refused as too large (HTTP 413: that
call made nothing). A chunk whose create was asked for and not refused may be a batch, even
where no lookup found it, so it is sent as planned.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import orjson

from .._exceptions import ProviderError
from ..providers import TAG_KEY, RemoteBatch
from ._collect import delete_upload
from ._context import RunContext
from ._outgoing import RequestLines
from ._records import IN_FLIGHT, Chunk, Failure
from ._verify import result_file_name

__all__ = ["audit", "reconcile", "submit", "write_chunk_file"]

log = logging.getLogger("llmbatch.jobs")


def write_chunk_file(ctx: RunContext, chunk: Chunk) -> Path:
    """The chunk's JSONL: its rows' request lines (`RequestLines`), in input order (same bytes every time)."""
    path = ctx.job_dir / "chunks" / f"{chunk.tag}.jsonl"
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as out, RequestLines(ctx.store, ctx.inputs) as lines:
        for row in ctx.store.chunk_rows(chunk.id):
            out.write(lines.line(row) + b"\n")
    os.replace(tmp, path)
    return path


def _over_budget(ctx: RunContext, chunk: Chunk) -> bool:
    """Whether sending `chunk` could take spend past `--max-cost` (and say so, once a chunk)."""
    cap = ctx.settings.max_cost
    if cap is None:
        return False
    committed = ctx.store.totals()["cost"] + ctx.store.in_flight_cost()
    if committed + chunk.est_cost <= cap:
        return False
    # Said once a chunk: the run looks again (and asks here again) each time a batch ends.
    if chunk.tag not in ctx.budget_said:
        ctx.budget_said.add(chunk.tag)
        ctx.say(
            f"budget: chunk {chunk.tag} (est. ${chunk.est_cost:.4f}) would take spend to "
            f"${committed + chunk.est_cost:.4f}, past the ${cap:.2f} cap; holding it back"
        )
    ctx.budget_blocked = True
    return True


async def submit(ctx: RunContext) -> bool:
    """Submits planned chunks while the in-flight, enqueued-token and budget limits allow."""
    store = ctx.store
    # An earlier upload or create failed or went unanswered: find out where it got to (list
    # and match by tag), or the chunk would sit in `uploading`/`creating` forever. A chunk that
    # cannot be settled yet waits alone (holding its in-flight slot): the others go on.
    await _reconcile_chunks(ctx)
    if not ctx.audited:
        try:
            await audit(ctx)
        except ProviderError as exc:
            if not exc.retryable:
                raise
            ctx.say(f"listing the job's batches failed: {exc}; will try again")
            return False
        if not ctx.audited:  # a lost batch whose rows are not known yet: any row may be one of them
            return False
    progressed = False
    in_flight = len(store.chunks(IN_FLIGHT))
    for chunk in store.chunks(("planned", "uploaded")):
        if _over_limits(ctx, chunk):
            message = (
                f"chunk {chunk.tag} ({chunk.rows} rows, {chunk.bytes:,} bytes) was never sent and is over this run's "
                f"limits ({ctx.batch_size:,} rows, {ctx.max_bytes:,} bytes): re-planning its rows"
            )
            await _replan(ctx, chunk, ("planned", "uploaded"), message)
            progressed = True
            continue
        if chunk.state == "planned":
            if in_flight >= ctx.max_in_flight or ctx.clock() < ctx.quota_wait_until:
                break
            if ctx.max_enqueued is not None:
                enqueued = store.in_flight_tokens(chunk.model)
                # A chunk over the limit on its own (one large row) goes when nothing of its
                # model is in flight; holding it back for that would hold it back forever.
                if enqueued and enqueued + chunk.est_input > ctx.max_enqueued:
                    continue
            if _over_budget(ctx, chunk):
                break
            in_flight += 1
        try:
            await _submit_chunk(ctx, chunk)
            progressed = True
        except ProviderError as exc:
            if exc.status == 413:  # refused as too large: that call made nothing
                await _split_refused(ctx, chunk, exc)
                if chunk.state == "planned":
                    in_flight -= 1
                progressed = True
                continue
            # A refused or unanswered call: the chunk stays where it is (reconcile sorts it out).
            store.update_chunk(chunk.id, submit_errors=chunk.submit_errors + 1)
            if not exc.retryable:  # refused for good (bad key, window, file): trying again cannot help
                raise
            ctx.say(f"chunk {chunk.tag}: {exc}; will try again")
    return progressed


def _over_limits(ctx: RunContext, chunk: Chunk) -> bool:
    """Whether a chunk not sent is larger than this run's limits allow (a rerun with a smaller
    --batch-size or --max-bytes), and may be re-planned: no create was ever asked for it. A
    chunk of one row stays: it cannot be split (and is as large as its row)."""
    too_large = chunk.rows > ctx.most_rows_planned or chunk.bytes > ctx.max_bytes
    return chunk.rows > 1 and too_large and not ctx.store.create_tried(chunk.id)


async def _replan(
    ctx: RunContext, chunk: Chunk, from_: tuple[str, ...], message: str, failed: list[Failure] | None = None
) -> None:
    """Dissolves a chunk no batch holds (in one of the states `from_`): its rows go back to
    pending (those in `failed` fail) and its upload and local files are deleted; the planner
    makes new chunks of them."""
    current = ctx.store.chunk_of_tag(chunk.tag) or chunk  # where the submission got to
    ctx.store.replan_chunk(chunk.id, from_, message, failed or [])
    ctx.say(message)
    (ctx.job_dir / "chunks" / f"{chunk.tag}.jsonl").unlink(missing_ok=True)
    if current.file_id:
        await delete_upload(ctx, chunk.tag, current.file_id)


#: Where a chunk is when its upload or create is refused: the intent of the call refused.
_REFUSED_IN = ("uploading", "creating")


async def _split_refused(ctx: RunContext, chunk: Chunk, exc: ProviderError) -> None:
    """A chunk whose upload or create was refused as too large (HTTP 413, so nothing was made
    of it) is re-planned, with this run's byte limit halved below its size: the provider takes
    less than the limits said (a proxy's body limit, translation larger than planned), and
    halving finds what it takes in a few tries. A chunk of one row cannot be split: the row
    fails, naming the refusal."""
    if chunk.rows > 1:
        ctx.max_bytes = max(min(ctx.max_bytes, chunk.bytes // 2), 1)
        message = (
            f"chunk {chunk.tag}: refused as too large ({exc}); splitting its {chunk.rows} rows into chunks "
            f"of at most {ctx.max_bytes:,} bytes"
        )
        await _replan(ctx, chunk, _REFUSED_IN, message)
        return
    (row,) = ctx.store.chunk_rows(chunk.id)
    error = f"request_too_large: this row alone is too large for a batch ({chunk.bytes:,} bytes as sent): {exc}"
    body = {"error": {"message": error, "type": "request_too_large", "param": None, "code": None}}
    line = {"id": None, "custom_id": row.custom_id, "response": {"status_code": 413, "request_id": None, "body": body},
            "error": None}  # fmt: skip
    failed = [Failure(orjson.dumps(line), error, row.idx)]
    await _replan(ctx, chunk, _REFUSED_IN, f"chunk {chunk.tag}: {error}; failing the row", failed)


async def _submit_chunk(ctx: RunContext, chunk: Chunk) -> None:
    store, provider = ctx.store, ctx.provider
    if chunk.state == "planned":
        path = write_chunk_file(ctx, chunk)
        store.move_chunk(chunk.id, "uploading", ("planned",), intent_at=int(time.time()))
        file_id = await provider.upload(chunk.tag, path)
        store.move_chunk(
            chunk.id, "uploaded", ("uploading",), f"chunk {chunk.tag}: uploaded {file_id}", file_id=file_id
        )
        chunk.file_id = file_id
    store.move_chunk(chunk.id, "creating", ("uploaded",), intent_at=int(time.time()))
    assert chunk.file_id is not None
    batch = await provider.create_batch(
        chunk.tag, ctx.job_id, chunk.file_id, chunk.endpoint, ctx.settings.completion_window
    )
    store.move_chunk(
        chunk.id, "submitted", ("creating",), f"chunk {chunk.tag}: batch {batch.id}",
        batch_id=batch.id, remote_status=batch.status.value, submitted_at=int(time.time()),
    )  # fmt: skip
    (ctx.job_dir / "chunks" / f"{chunk.tag}.jsonl").unlink(missing_ok=True)
    log.info("chunk %s submitted as batch %s (%d rows)", chunk.tag, batch.id, chunk.rows)


async def reconcile(ctx: RunContext) -> None:
    """Resolves what a crash left between intent and result: direct calls go back to pending,
    chunks in `uploading`/`creating` are looked up by their tag."""
    requeued = ctx.store.requeue_interrupted_direct()
    if requeued:
        ctx.say(f"{requeued} rows were with the direct API when the last run stopped; sending them again")
    await _reconcile_chunks(ctx, strict=True)


async def _reconcile_chunks(ctx: RunContext, *, strict: bool = False) -> None:
    """Looks up each chunk caught in `uploading`/`creating`; one that cannot be settled yet (a
    failed lookup, or batches that cannot be told apart until they end) stays there, said once,
    and is looked up again next round. `strict`: a lookup refused for good raises."""
    for chunk in ctx.store.chunks(("uploading", "creating")):
        try:
            await _reconcile_chunk(ctx, chunk)
        except ProviderError as exc:
            if strict and not exc.retryable:
                raise
            if chunk.tag not in ctx.lookups_waiting:
                ctx.say(f"looking up chunk {chunk.tag}'s earlier submission failed: {exc}; will try again")
            ctx.lookups_waiting[chunk.tag] = str(exc)
            continue
        if ctx.lookups_waiting.pop(chunk.tag, None) is not None:
            log.info("chunk %s: its earlier submission is settled", chunk.tag)


async def _reconcile_chunk(ctx: RunContext, chunk: Chunk) -> None:
    store, provider = ctx.store, ctx.provider
    since = (chunk.intent_at or chunk.created_at) - 300
    if chunk.state == "uploading":
        file_id = await provider.find_upload(chunk.tag, since)
        if file_id:
            message = f"chunk {chunk.tag}: found upload {file_id}"
            store.move_chunk(chunk.id, "uploaded", ("uploading",), message, file_id=file_id)
        else:
            store.move_chunk(chunk.id, "planned", ("uploading",), f"chunk {chunk.tag}: no upload found")
    else:
        batch = await provider.find_batch(chunk.tag, since, chunk.file_id)
        if batch is not None:
            store.move_chunk(
                chunk.id, "submitted", ("creating",), f"chunk {chunk.tag}: found batch {batch.id}",
                batch_id=batch.id, remote_status=batch.status.value, submitted_at=batch.created_at,
            )  # fmt: skip
        else:
            store.move_chunk(chunk.id, "uploaded", ("creating",), f"chunk {chunk.tag}: no batch found")


async def audit(ctx: RunContext) -> None:
    """Compares the store with the job's batches at the provider, once per run, before anything
    is submitted; a batch the store does not record under its tag (the store was damaged,
    cut or rolled back to an older copy) is adopted, never created again.

    One listing of the job's batches. When every batch in it is recorded under its tag, the
    store is consistent with the provider, and as only this process submits while it holds
    the job's lock, every chunk planned from here on is provably unsent (its tag is past the
    highest one the store knows). Otherwise the chunks never sent are dissolved and each lost
    batch becomes a submitted chunk again, holding those of its rows that are still pending.

    A lost batch whose rows cannot be read before it ends (Gemini, Anthropic: no readable
    input) is polled each round instead, and nothing is sent until it has ended and been
    adopted: its rows are not known, so any pending row may be one of them.
    """
    store, provider = ctx.store, ctx.provider
    first = ctx.audit_waiting is None
    if ctx.audit_waiting is None:
        listed = await provider.list_job_batches(ctx.job_id, _earliest_batch_time(ctx), ctx.job_dir / "chunks")
        if listed is None:  # a provider that cannot list a job's batches: nothing to compare
            ctx.audited = True
            return
        known = store.tag_batches()
        lost: dict[str, RemoteBatch] = {}
        for b in sorted(listed, key=lambda b: (b.created_at, b.id)):
            tag = b.metadata.get(TAG_KEY)
            if not tag or known.get(tag) == b.id:
                continue
            if known.get(tag) is not None or tag in lost:
                ctx.say(f"chunk {tag}: the provider has a second batch {b.id} for it; leaving it alone")
                continue
            lost[tag] = b
        if lost:
            ctx.say(
                f"the job store does not record {len(lost)} of the job's batches at the provider "
                "(was it damaged or restored from an older copy?); adopting them instead of sending their rows again"
            )
        ctx.audit_waiting = lost
    else:
        for tag, b in list(ctx.audit_waiting.items()):
            ctx.audit_waiting[tag] = await provider.get_batch(b.id)
    readable: list[tuple[str, RemoteBatch, list[str]]] = []
    for tag, b in ctx.audit_waiting.items():
        ids = await _batch_ids(ctx, tag, b)
        if ids is not None:
            readable.append((tag, b, ids))
        elif first:
            ctx.say(
                f"chunk {tag}: batch {b.id} ({b.status.value}) is not in the job store, and which rows it "
                "holds can be read only once it ends; holding back new batches until then"
            )
    if readable:
        store.dissolve_planned()
        for tag, b, ids in readable:
            n = store.adopt_batch(tag, b.id, b.status.value, b.input_file_id, b.created_at, ids)
            _estimate_adopted(ctx, tag)
            ctx.say(f"chunk {tag}: adopted batch {b.id} ({n} of its {len(ids)} rows were still to run)")
            del ctx.audit_waiting[tag]
    ctx.audited = not ctx.audit_waiting


def _estimate_adopted(ctx: RunContext, tag: str) -> None:
    """Prices an adopted chunk's rows as the planner would have (each row at its own tier), so
    that `--max-cost` counts the batch while it runs."""
    chunk = ctx.store.chunk_of_tag(tag)
    if chunk is None or chunk.state != "submitted":
        return
    price = ctx.tariff(chunk.model)
    cost = sum(price(est_in, est_out) for est_in, est_out in ctx.store.queued_estimates(chunk.id))
    ctx.store.update_chunk(chunk.id, est_cost=cost)


def _earliest_batch_time(ctx: RunContext) -> int:
    """No batch of this job can predate its inputs: the job's id covers their modification
    times (less an hour for clocks that disagree). A job of calls (no input files) lists all."""
    job = ctx.store.job() or {}
    stamps = [int(i["mtime_ns"]) // 1_000_000_000 for i in job.get("inputs") or []]
    return max(min(stamps) - 3600, 0) if stamps else 0


async def _batch_ids(ctx: RunContext, tag: str, batch: RemoteBatch) -> list[str] | None:
    """The ids of the rows a batch holds: from its input file, or, where that is gone, from its
    results (a finished batch answers every row it held, in one file or the other). None while
    neither can be read: a batch still running whose input the provider does not give back (or
    has deleted)."""
    sources = [batch.input_file_id] if batch.input_file_id else []
    if not sources or batch.status.terminal:
        sources += [f for f in (batch.output_file_id, batch.error_file_id) if f]
    ids: list[str] = []
    for file_id in sources:
        # An input file is read and dropped; a result file goes where collecting the batch
        # will look for it (`RunContext.fetched`), so that it is downloaded once.
        is_input = file_id == batch.input_file_id
        if is_input:
            dest = ctx.job_dir / "chunks" / f"{tag}.adopt"
        else:
            dest = ctx.job_dir / "results" / result_file_name(tag, file_id)
        try:
            await ctx.provider.download(file_id, dest)
        except ProviderError as exc:
            if exc.status != 404:
                raise
            continue
        try:
            with open(dest, "rb") as fh:
                for line in fh:
                    if line.strip():
                        cid = orjson.loads(line).get("custom_id")
                        if cid is not None:
                            ids.append(str(cid))
        finally:
            if is_input:
                dest.unlink(missing_ok=True)
            else:
                ctx.fetched[file_id] = dest
        if is_input:
            return ids
    if not batch.status.terminal:  # its input is gone, and it has no results yet
        return None
    return list(dict.fromkeys(ids))
