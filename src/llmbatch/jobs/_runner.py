"""The job runner: input rows in, exactly one result per row out, whatever happens between.

    ingest (validate + estimate every row) -> plan chunks under the limits -> for each chunk:
    record intent -> upload (tagged) -> record intent -> create batch (tagged) -> poll ->
    download results -> rows succeeded / back to pending / failed -> ... -> export in input order

Every step is recorded in the job store before and after its remote call, so a run killed at
any instant resumes from the store: a chunk left in `uploading` or `creating` is first looked
up by its tag (list and match), and only created when the provider has none. A chunk never
gets two remote batches.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import ConfigError, ProviderError, StateError
from ..pricing import PriceTable, Tariff
from ..providers import Provider, RemoteBatch, RemoteStatus
from ._progress import LiveProgress, PlainProgress, Snapshot
from ._settings import JobSettings
from ._store import Chunk, JobStore, Result, ResultRef

__all__ = ["JobRunner", "RunOutcome", "EXIT_OK", "EXIT_FAILED_ROWS", "EXIT_USAGE", "EXIT_BUDGET", "EXIT_INTERRUPTED"]

log = logging.getLogger("llmbatch.jobs")

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_RETRYABLE_CODES = {"batch_expired", "batch_cancelled"}
#: Batch-level error codes meaning "the quota is full", not "these rows are bad".
_QUOTA_CODES = {"token_limit_exceeded"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def is_retryable_status(status: int) -> bool:
    """429, 408, 409 and 5xx are worth another attempt; any other 4xx is the request's fault."""
    return status in (408, 409, 429) or status >= 500


@dataclass
class RunOutcome:
    """How a run ended: its exit code and a one-line summary."""

    code: int
    summary: str


class JobRunner:
    """Runs one job to its end, against one provider."""

    def __init__(
        self,
        store: JobStore,
        job_dir: Path,
        settings: JobSettings,
        provider: Provider,
        *,
        prices: PriceTable | None = None,
        say: Callable[[str], None] = print,
        progress: PlainProgress | LiveProgress | None = None,
    ) -> None:
        self.store = store
        self.job_dir = job_dir
        self.settings = settings
        self.provider = provider
        if prices is None:
            prices = PriceTable.load(settings.price_file).for_provider(settings.provider)
            prices = prices.priced_as(store.models(), settings.price_as)
        self.prices = prices
        self.progress = progress or PlainProgress(say)
        self.say = self.progress.message
        job = store.job()
        assert job is not None
        self.job_id: str = job["id"]
        self.inputs = [Path(i["path"]) for i in job["inputs"]]
        limits = provider.limits
        self.batch_size = min(settings.batch_size or limits.max_requests, limits.max_requests)
        self.max_bytes = min(settings.max_bytes or limits.max_bytes, limits.max_bytes)
        self.max_in_flight = settings.max_in_flight or limits.max_in_flight
        self.max_enqueued = settings.max_enqueued_tokens or limits.max_enqueued_tokens
        (job_dir / "chunks").mkdir(exist_ok=True)
        (job_dir / "results").mkdir(exist_ok=True)
        self._budget_blocked = False
        self._quota_failures = 0
        self._quota_wait_until = 0.0
        self._tariffs: dict[tuple[str, bool], Tariff] = {}

    @property
    def budget_blocked(self) -> bool:
        """Whether the budget is holding back the next chunk."""
        return self._budget_blocked

    # -- pricing -------------------------------------------------------------------------

    def tariff(self, model: str, *, batch: bool = True) -> Tariff:
        """Prices one request of `model` at batch or direct prices (0 for a provider that bills
        nothing, or a model without a price)."""
        key = (model, batch)
        found = self._tariffs.get(key)
        if found is None:
            price = self.prices.lookup(model) if self.provider.billed else None
            found = self._tariffs[key] = Tariff(price, batch=batch)
        return found

    def unpriced_models(self) -> list[str]:
        if not self.provider.billed:
            return []
        return [m for m in self.store.models() if self.prices.lookup(m) is None]

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> RunOutcome:
        """Plans, submits, polls and collects until every row is final (or the budget stops it)."""
        if self.settings.max_cost is not None:
            missing = self.unpriced_models()
            if missing:
                raise ConfigError(
                    f"--max-cost needs prices, and there are none for {', '.join(missing)}: "
                    "pass --price-file FILE or --price-input/--price-output (USD per 1M tokens)"
                )
        try:
            await self.reconcile()
        except ProviderError as exc:
            if not exc.retryable:
                raise
            # Not sure yet what an interrupted submission created: `submit` asks again each round.
            self.say(f"looking up earlier submissions failed: {exc}; will try again")
        # One chunk first: the provider starts on it while the rest are planned and uploaded.
        first = self.plan(limit=1)
        self.store.set_job(status="running")
        if first:
            await self.submit()
            self.plan(direct=False)  # the same round: the rows left are not "the last few"
        delay = self.settings.poll_interval
        while True:
            progressed = await self.submit()
            progressed |= await self.poll()
            if self.plan():
                progressed = True
            progressed |= await self.run_direct()
            active = self.store.chunks(("uploading", "uploaded", "creating", "submitted"))
            planned = self.store.chunks(("planned",))
            if not active and not planned and not self.store.pending_count():
                break
            if not active and planned and self._budget_blocked:
                # The batches whose estimates blocked the budget have finished, and their actual
                # cost (usually far below the estimate) now counts instead: look again.
                self._budget_blocked = False
                progressed |= await self.submit()
                active = self.store.chunks(("uploading", "uploaded", "creating", "submitted"))
            if not active and self._budget_blocked:
                self.store.set_job(status="budget_stopped")
                return self._finish(budget_stopped=True)
            self.report()
            delay = self.settings.poll_interval if progressed else min(delay * 1.5, self.settings.max_poll_interval)
            await asyncio.sleep(delay)
        self.store.set_job(status="finished")
        return self._finish()

    def _finish(self, budget_stopped: bool = False) -> RunOutcome:
        out, err = self.export()
        c = self.store.counts()
        t = self.store.totals()
        failed = c["failed"] + c["invalid"]
        summary = (
            f"{c['succeeded']} succeeded, {failed} failed"
            + (f", {c['pending'] + c['queued']} not run (budget cap reached)" if budget_stopped else "")
            + f"; {int(t['input_tokens'])} input + {int(t['output_tokens'])} output tokens, ${t['cost']:.4f}"
            + f"\nresults: {out}"
            + (f"\nerrors:  {err}" if failed else "")
        )
        if budget_stopped:
            return RunOutcome(EXIT_BUDGET, summary)
        return RunOutcome(EXIT_FAILED_ROWS if failed else EXIT_OK, summary)

    def report(self) -> None:
        """Tells the progress display where the job stands."""
        c = self.store.counts()
        batches = self.store.batches_by_state(("planned", "uploading", "uploaded", "creating", "submitted"))
        self.progress.update(
            Snapshot(
                total=sum(c.values()),
                done=c["succeeded"] + c["failed"] + c["invalid"],
                failed=c["failed"] + c["invalid"],
                batches=batches,
                spent=self.store.totals()["cost"],
                cap=self.settings.max_cost,
            )
        )

    # -- planning ------------------------------------------------------------------------

    def plan(self, *, full_only: bool = False, limit: int | None = None, direct: bool = True) -> bool:
        """Packs pending rows into chunks (one endpoint and model each, under the limits);
        returns whether it planned any.

        `full_only`: only chunks that reached a limit (requests, bytes or tokens); the rest
        stays pending (the Python API's batching waits for more calls or its send delay).
        `limit`: at most this many chunks now (the first goes out before the rest are planned).
        `direct`: leave the rows to `run_direct` when no more than `--direct-below` are pending.
        Rows are read in pages of a chunk's size, so memory stays flat however large the job.
        """
        if direct and self.settings.direct_below and self.store.pending_count() <= self.settings.direct_below:
            return False  # few enough left: `run_direct` sends them now instead
        planned = 0
        for endpoint, model in self.store.pending_groups():
            price = self.tariff(model)
            rows: deque[tuple[int, int, int, int, int, int]] = deque()
            read_to, more = -1, True
            while limit is None or planned < limit:
                if more and len(rows) < self.batch_size:
                    page = self.store.pending_rows(endpoint, model, read_to, self.batch_size)
                    more = len(page) == self.batch_size
                    if page:
                        rows.extend(page)
                        read_to = page[-1][0]
                if not rows:
                    break
                idxs: list[int] = []
                nbytes = est_in = est_out = 0
                est_cost = 0.0
                full = False
                while rows and len(idxs) < self.batch_size:
                    idx, _file_no, _offset, length, row_in, row_out = rows[0]
                    too_big = nbytes + length + 1 > self.max_bytes
                    too_heavy = self.max_enqueued is not None and est_in + row_in > self.max_enqueued
                    if idxs and (too_big or too_heavy):
                        full = True  # the row that did not fit starts the next chunk
                        break
                    rows.popleft()
                    idxs.append(idx)
                    nbytes += length + 1
                    est_in += row_in
                    est_out += row_out
                    est_cost += price(row_in, row_out)  # per row: a long prompt costs more per token
                if full_only and not (full or len(idxs) >= self.batch_size):
                    break
                self._plan_chunk(endpoint, model, idxs, nbytes, est_in, est_out, est_cost)
                planned += 1
        return planned > 0

    def _plan_chunk(
        self, endpoint: str, model: str, idxs: list[int], nbytes: int, est_in: int, est_out: int, est_cost: float
    ) -> None:
        n = int(self.store.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        tag = f"{self.job_id}-c{n + 1:05d}"
        self.store.plan_chunk(tag, endpoint, model, idxs, nbytes, est_in, est_out, est_cost)

    # -- submitting ----------------------------------------------------------------------

    def _write_chunk_file(self, chunk: Chunk) -> Path:
        """The chunk's JSONL: its rows' original lines, in input order (same bytes every time)."""
        path = self.job_dir / "chunks" / f"{chunk.tag}.jsonl"
        tmp = path.with_suffix(".part")
        handles: dict[int, Any] = {}
        try:
            with open(tmp, "wb") as out:
                for idx, file_no, offset, length, _cid, remote_id, rewrite, model in self.store.chunk_rows(chunk.id):
                    if file_no < 0:  # a call made through the Python API: its request is in the store
                        line = self.store.request(idx)
                    else:
                        fh = handles.get(file_no) or handles.setdefault(file_no, open(self.inputs[file_no], "rb"))
                        fh.seek(offset)
                        line = fh.read(length)
                    if remote_id or rewrite:  # the id the provider accepts; the model the job sets
                        rec = orjson.loads(line)
                        if remote_id:
                            rec["custom_id"] = remote_id
                        if rewrite:
                            rec["body"]["model"] = model
                        line = orjson.dumps(rec)
                    out.write(line + b"\n")
        finally:
            for fh in handles.values():
                fh.close()
        os.replace(tmp, path)
        return path

    async def submit(self) -> bool:
        """Submits planned chunks while the in-flight, enqueued-token and budget limits allow."""
        if self.store.chunks(("uploading", "creating")):
            # An earlier upload or create failed or went unanswered: find out where it got to
            # (list and match by tag), or the chunk would sit in `uploading`/`creating` forever.
            try:
                await self._reconcile_chunks()
            except ProviderError as exc:
                self.say(f"looking up earlier submissions failed: {exc}; will try again")
                return False
        progressed = False
        in_flight = len(self.store.chunks(("uploading", "uploaded", "creating", "submitted")))
        for chunk in self.store.chunks(("planned", "uploaded")):
            if chunk.state == "planned":
                if in_flight >= self.max_in_flight or time.monotonic() < self._quota_wait_until:
                    break
                if self.max_enqueued is not None:
                    enqueued = self.store.in_flight_tokens(chunk.model)
                    # A chunk over the limit on its own (one large row) goes when nothing of its
                    # model is in flight; holding it back for that would hold it back forever.
                    if enqueued and enqueued + chunk.est_input > self.max_enqueued:
                        continue
                if self.settings.max_cost is not None:
                    committed = self.store.totals()["cost"] + self.store.in_flight_cost()
                    if committed + chunk.est_cost > self.settings.max_cost:
                        if not self._budget_blocked:
                            self.say(
                                f"budget: chunk {chunk.tag} (est. ${chunk.est_cost:.4f}) would take spend to "
                                f"${committed + chunk.est_cost:.4f}, past the ${self.settings.max_cost:.2f} cap; "
                                "holding it back"
                            )
                        self._budget_blocked = True
                        break
                in_flight += 1
            try:
                await self._submit_chunk(chunk)
                progressed = True
            except ProviderError as exc:
                self._submit_failed(chunk, exc)
        return progressed

    async def _submit_chunk(self, chunk: Chunk) -> None:
        if chunk.state == "planned":
            path = self._write_chunk_file(chunk)
            self.store.move_chunk(chunk.id, "uploading", ("planned",), intent_at=int(time.time()))
            file_id = await self.provider.upload(chunk.tag, path)
            self.store.move_chunk(
                chunk.id, "uploaded", ("uploading",), f"chunk {chunk.tag}: uploaded {file_id}", file_id=file_id
            )
            chunk.file_id = file_id
        self.store.move_chunk(chunk.id, "creating", ("uploaded",), intent_at=int(time.time()))
        assert chunk.file_id is not None
        batch = await self.provider.create_batch(
            chunk.tag, self.job_id, chunk.file_id, chunk.endpoint, self.settings.completion_window
        )
        self.store.move_chunk(
            chunk.id, "submitted", ("creating",), f"chunk {chunk.tag}: batch {batch.id}",
            batch_id=batch.id, remote_status=batch.status.value, submitted_at=int(time.time()),
        )  # fmt: skip
        (self.job_dir / "chunks" / f"{chunk.tag}.jsonl").unlink(missing_ok=True)
        log.info("chunk %s submitted as batch %s (%d rows)", chunk.tag, batch.id, chunk.rows)

    def _submit_failed(self, chunk: Chunk, exc: ProviderError) -> None:
        """A refused or unanswered call: leave the chunk where it is (reconcile sorts it out)."""
        self.store.update_chunk(chunk.id, submit_errors=chunk.submit_errors + 1)
        if not exc.retryable:  # refused for good (bad key, window, file): trying again cannot help
            raise exc
        self.say(f"chunk {chunk.tag}: {exc}; will try again")

    async def reconcile(self) -> None:
        """Resolves chunks caught between intent and result by a crash: list and match by tag."""
        requeued = self.store.requeue_interrupted_direct()
        if requeued:
            self.say(f"{requeued} rows were with the direct API when the last run stopped; sending them again")
        await self._reconcile_chunks()

    async def _reconcile_chunks(self) -> None:
        for chunk in self.store.chunks(("uploading", "creating")):
            since = (chunk.intent_at or chunk.created_at) - 300
            if chunk.state == "uploading":
                file_id = await self.provider.find_upload(chunk.tag, since)
                if file_id:
                    self.store.move_chunk(
                        chunk.id,
                        "uploaded",
                        ("uploading",),
                        f"chunk {chunk.tag}: found upload {file_id}",
                        file_id=file_id,
                    )
                else:
                    self.store.move_chunk(chunk.id, "planned", ("uploading",), f"chunk {chunk.tag}: no upload found")
            else:
                batch = await self.provider.find_batch(chunk.tag, since, chunk.file_id)
                if batch is not None:
                    self.store.move_chunk(
                        chunk.id, "submitted", ("creating",), f"chunk {chunk.tag}: found batch {batch.id}",
                        batch_id=batch.id, remote_status=batch.status.value, submitted_at=batch.created_at,
                    )  # fmt: skip
                else:
                    self.store.move_chunk(chunk.id, "uploaded", ("creating",), f"chunk {chunk.tag}: no batch found")

    # -- polling and collecting ----------------------------------------------------------

    async def poll(self) -> bool:
        progressed = False
        for chunk in self.store.chunks(("submitted",)):
            assert chunk.batch_id is not None
            try:
                batch = await self.provider.get_batch(chunk.batch_id)
            except ProviderError as exc:
                self.say(f"chunk {chunk.tag}: polling failed: {exc}; will try again")
                continue
            if (batch.status.value, batch.completed, batch.failed) != (
                chunk.remote_status,
                chunk.remote_completed,
                chunk.remote_failed,
            ):
                self.store.update_chunk(
                    chunk.id,
                    remote_status=batch.status.value,
                    remote_completed=batch.completed,
                    remote_failed=batch.failed,
                )
                progressed = True
            if batch.status.terminal:
                try:
                    await self.collect(chunk, batch)
                except ProviderError as exc:  # the results stay remote: fetch them on a later poll
                    self.say(f"chunk {chunk.tag}: downloading results failed: {exc}; will try again")
                    continue
                progressed = True
        return progressed

    async def collect(self, chunk: Chunk, batch: RemoteBatch) -> None:
        """Downloads a finished batch's results and applies them to its rows, in one transaction."""
        rows = self.store.chunk_rows(chunk.id)
        by_id = {remote or cid: idx for idx, _f, _o, _l, cid, remote, _r, _m in rows}
        cid_of = {idx: cid for idx, _f, _o, _l, cid, *_ in rows}
        by_line = [idx for idx, *_ in rows]
        tariff = self.tariff(chunk.model)
        attempts = dict(
            self.store.db.execute("SELECT idx, attempts FROM rows WHERE chunk_id=? AND state='queued'", (chunk.id,))
        )
        succeeded: list[tuple[Result, int, int, int, int, float, int]] = []
        retry: list[tuple[str, int]] = []
        failed: list[tuple[Result, str, int]] = []
        refund: list[tuple[str, int]] = []
        seen: set[int] = set()
        # Rows cut off by the user's own `llmbatch cancel` were never really tried: they go back
        # to pending with their attempt refunded, so a resume runs them whatever --max-attempts.
        user_cancelled = (self.store.job() or {}).get("status") == "cancelled"

        def give_up_or_retry(idx: int, line: Result, message: str) -> None:
            if user_cancelled and message.startswith("batch_cancelled:"):
                refund.append((message, idx))
            elif attempts.get(idx, 0) < self.settings.max_attempts:
                retry.append((message, idx))
            else:
                failed.append((line, message, idx))

        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            name = f"{chunk.tag}-{_SAFE_NAME.sub('_', file_id)}.jsonl"
            dest = self.job_dir / "results" / name
            await self.provider.download(file_id, dest)
            # Rows keep their results as references into this file, so it must be on disk
            # before the transaction that points at it commits.
            with open(dest, "rb") as fh:
                os.fsync(fh.fileno())
            ref_file = self.store.result_file(f"results/{name}")
            with open(dest, "rb") as fh:
                end = 0
                for raw in fh:
                    start, end = end, end + len(raw)
                    line = raw.rstrip(b"\r\n")
                    if not line or line.isspace():
                        continue
                    try:
                        rec = orjson.loads(line)
                        idx = by_id[rec["custom_id"]]
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        log.warning("chunk %s: ignoring an unmatched result line", chunk.tag)
                        continue
                    if idx in seen:
                        continue
                    seen.add(idx)
                    result: Result
                    if rec["custom_id"] != cid_of[idx]:  # sent under an id the provider accepts
                        rec["custom_id"] = cid_of[idx]
                        result = orjson.dumps(rec)
                    else:
                        result = ResultRef(ref_file, start, len(line))
                    self._classify(tariff, idx, result, rec, succeeded, failed, give_up_or_retry)
        # Rows the provider said nothing about: a failed batch names bad lines; others are retried.
        line_errors = {e.get("line"): e for e in batch.errors if isinstance(e.get("line"), int)}
        general = "; ".join(e.get("message") or "" for e in batch.errors if not isinstance(e.get("line"), int))
        # A batch refused because the provider's enqueued-token quota was full (Azure) says
        # nothing about its rows: they go back without using up an attempt, after a pause.
        quota_full = bool(batch.errors) and all(e.get("code") in _QUOTA_CODES for e in batch.errors)
        if quota_full:
            backoff = min(max(self.settings.poll_interval, 1.0) * 2**self._quota_failures, 900.0)
            self._quota_failures += 1
            self._quota_wait_until = time.monotonic() + backoff
            self.say(f"chunk {chunk.tag}: the provider's token quota is full ({general}); "
                     f"sending again in {backoff:.0f} s")  # fmt: skip
        for n, idx in enumerate(by_line, start=1):
            if idx in seen:
                continue
            if n in line_errors:
                e = line_errors[n]
                message = f"rejected by the provider: {e.get('code')}: {e.get('message')}"
                failed.append((_error_line(cid_of[idx], e.get("code") or "invalid_request", message), message, idx))
            else:
                reason = general or f"no result for this row in batch {batch.id} ({batch.status.value})"
                if batch.status is RemoteStatus.CANCELLED:  # cut off: refunded when the user cancelled
                    reason = f"batch_cancelled: {reason}"
                elif batch.status is RemoteStatus.EXPIRED:
                    reason = f"batch_expired: {reason}"
                if quota_full:
                    refund.append((reason, idx))
                    continue
                give_up_or_retry(idx, _error_line(cid_of[idx], "missing_result", reason), reason)
        self.store.collect(chunk.id, succeeded, retry, failed, batch.status.value, refund=refund)
        if batch.status is RemoteStatus.COMPLETED:
            self._quota_failures = 0
        if chunk.file_id and not self.settings.keep_uploads:
            # The input is no longer needed, and uploads count against per-account file caps.
            try:
                await self.provider.delete_file(chunk.file_id)
            except ProviderError as exc:
                log.warning("chunk %s: could not delete its upload %s: %s", chunk.tag, chunk.file_id, exc)

    def _classify(
        self,
        tariff: Tariff,
        idx: int,
        line: Result,
        rec: dict[str, Any],
        succeeded: list[tuple[Result, int, int, int, int, float, int]],
        failed: list[tuple[Result, str, int]],
        give_up_or_retry: Callable[[int, Result, str], None],
    ) -> None:
        """Sorts one answered row into succeeded (priced by `tariff`), failed, or retry."""
        response = rec.get("response") or {}
        error = rec.get("error")
        status = response.get("status_code") if isinstance(response, dict) else None
        if error is None and isinstance(status, int) and 200 <= status < 300:
            body = response.get("body") or {}
            u = body.get("usage") or {} if isinstance(body, dict) else {}
            inp = u.get("prompt_tokens", u.get("input_tokens", 0)) or 0
            out = u.get("completion_tokens", u.get("output_tokens", 0)) or 0
            cached = (u.get("prompt_tokens_details") or u.get("input_tokens_details") or {}).get("cached_tokens") or 0
            reasoning = (u.get("completion_tokens_details") or u.get("output_tokens_details") or {}).get(
                "reasoning_tokens"
            ) or 0
            spent = tariff(inp, out, cached)
            succeeded.append((line, inp, out, cached, reasoning, spent, idx))
            return
        if isinstance(error, dict):
            code = error.get("code") or "error"
            message = f"{code}: {error.get('message')}"
            if code in _RETRYABLE_CODES or code not in ("invalid_request",):
                give_up_or_retry(idx, line, message)
            else:
                failed.append((line, message, idx))
            return
        body = response.get("body") if isinstance(response, dict) else None
        err = body.get("error") if isinstance(body, dict) else None
        detail = err.get("message") if isinstance(err, dict) else None
        message = f"HTTP {status}: {detail or 'error'}"
        if isinstance(status, int) and not is_retryable_status(status):
            failed.append((line, message, idx))
        else:
            give_up_or_retry(idx, line, message)

    # -- the direct API ------------------------------------------------------------------

    async def run_direct(self) -> bool:
        """Sends the last few pending rows (`--direct-below`) through the direct API, bounded.

        A row in flight when the process dies is sent again on resume: at most
        `direct_below` rows can be paid twice, which is the price of not waiting a batch cycle.
        """
        limit = self.settings.direct_below
        pending = self.store.pending_count()
        if not limit or not pending or pending > limit or self._budget_blocked:
            return False
        if self.settings.max_cost is not None:
            est = self.store.db.execute("SELECT model, est_input, est_output FROM rows WHERE state='pending'")
            direct_cost = sum(self.tariff(m, batch=False)(i, o) for m, i, o in est)  # few rows: priced one by one
            committed = self.store.totals()["cost"] + self.store.in_flight_cost()
            if committed + direct_cost > self.settings.max_cost:
                self.say(f"budget: the last {pending} rows at direct prices (est. ${direct_cost:.4f}) pass the cap")
                self._budget_blocked = True
                return False
        rows = self.store.start_direct()
        self.say(f"sending the last {len(rows)} rows through the direct API")
        attempts = dict(
            self.store.db.execute("SELECT idx, attempts FROM rows WHERE state='queued' AND chunk_id IS NULL")
        )
        succeeded: list[tuple[Result, int, int, int, int, float, int]] = []
        retry: list[tuple[str, int]] = []
        failed: list[tuple[Result, str, int]] = []
        slots = asyncio.Semaphore(self.settings.direct_concurrency)

        def give_up_or_retry(idx: int, line: Result, message: str) -> None:
            if attempts.get(idx, 0) < self.settings.max_attempts:
                retry.append((message, idx))
            else:
                failed.append((line, message, idx))

        async def one(idx: int, file_no: int, offset: int, length: int, cid: str, endpoint: str, model: str) -> None:
            if file_no < 0:
                body = orjson.loads(self.store.request(idx))["body"]
            else:
                with open(self.inputs[file_no], "rb") as fh:
                    fh.seek(offset)
                    body = orjson.loads(fh.read(length))["body"]
            async with slots:
                status, answer = await self.provider.direct(endpoint, body)
            rec = {
                "id": None,
                "custom_id": cid,
                "response": {"status_code": status, "request_id": None, "body": answer},
                "error": None,
            }
            line = orjson.dumps(rec)
            self._classify(self.tariff(model, batch=False), idx, line, rec, succeeded, failed, give_up_or_retry)

        await asyncio.gather(*(one(*r[:7]) for r in rows))
        self.store.finish_direct(succeeded, retry, failed)
        return True

    # -- cancelling ----------------------------------------------------------------------

    async def cancel(self) -> int:
        """Cancels every remote batch of the job; finished rows are collected by a later run."""
        n = 0
        for chunk in self.store.chunks(("submitted",)):
            if chunk.batch_id and (chunk.remote_status or "") not in {s.value for s in RemoteStatus if s.terminal}:
                try:
                    await self.provider.cancel(chunk.batch_id)
                    n += 1
                except ProviderError as exc:
                    self.say(f"chunk {chunk.tag}: cancel failed: {exc}")
        self.store.set_job(status="cancelled")
        return n

    # -- exporting -----------------------------------------------------------------------

    def export(self) -> tuple[Path, Path]:
        """Writes the job's output and errors files (see `export`)."""
        return export(self.store, self.inputs, self.settings)


def output_paths(inputs: list[Path], settings: JobSettings, job_dir: Path | None = None) -> tuple[Path, Path]:
    """The results and errors files: as set, else next to the first input (a job of calls made
    through the Python API has no input file: its files go in its job directory)."""
    first = inputs[0] if inputs else (job_dir or Path.cwd()) / "calls.jsonl"
    stem = first.name[: -len(".jsonl")] if first.name.endswith(".jsonl") else first.name
    out = settings.output or first.with_name(f"{stem}.results.jsonl")
    err = settings.errors or out.with_name(
        out.name.replace(".results.jsonl", ".errors.jsonl") if ".results." in out.name else f"{out.stem}.errors.jsonl"
    )
    return out, err


def output_lines(store: JobStore, inputs: list[Path]) -> Iterator[tuple[str, bytes]]:
    """(row state, output line) of every row, in input order: its result line when it succeeded,
    the provider's error line (or one naming its file and line) when it failed or was invalid,
    a `not_run` error line when the job stopped before it ran."""
    with ResultReader(store) as results:
        for _idx, file_no, line_no, custom_id, state, result, error in store.export_rows():
            if state == "succeeded" and result is not None:
                yield state, results.line(result)
            elif state in ("failed", "invalid"):
                if result is not None:
                    yield state, results.line(result)
                else:
                    where = f"{inputs[file_no].name}:{line_no}" if file_no >= 0 else "a call"
                    yield state, _error_line(custom_id, "invalid_request", f"{where}: {error}")
            else:  # pending or queued: the job stopped before this row ran
                yield state, _error_line(custom_id, "not_run", "not run: the job stopped before this row was sent")


def export(store: JobStore, inputs: list[Path], settings: JobSettings) -> tuple[Path, Path]:
    """Writes one line per input row, in input order; final failures also to the errors file."""
    out_path, err_path = output_paths(inputs, settings, store.path.parent)
    tmp_out, tmp_err = out_path.with_name(out_path.name + ".part"), err_path.with_name(err_path.name + ".part")
    any_errors = False
    with open(tmp_out, "wb") as out, open(tmp_err, "wb") as err:
        for state, line in output_lines(store, inputs):
            if state in ("failed", "invalid"):
                err.write(line + b"\n")
                any_errors = True
            out.write(line + b"\n")
    os.replace(tmp_out, out_path)
    if any_errors:
        os.replace(tmp_err, err_path)
    else:
        tmp_err.unlink()
        err_path.unlink(missing_ok=True)
    return out_path, err_path


class ResultReader:
    """Reads result lines out of a job's downloaded result files (memory-mapped).

    At most `_OPEN_MAPS` files stay mapped (and open), the least recently read closed first: an
    export in input order moves from one chunk's files to the next, and a mapped file's pages count
    towards the process's memory while it stays mapped, so a long job's export would otherwise
    grow with it (and run out of file handles).
    """

    def __init__(self, store: JobStore) -> None:
        self.root = store.path.parent
        self.paths = store.result_files()
        self.maps: OrderedDict[int, mmap.mmap] = OrderedDict()

    def __enter__(self) -> ResultReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    def line(self, result: Result) -> bytes:
        if not isinstance(result, ResultRef):
            return result
        maps = self.maps
        m = maps.get(result.file)
        if m is None:
            path = self.root / self.paths[result.file]
            try:
                with open(path, "rb") as fh:
                    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise StateError(f"{path}: a result file of this job is missing or unreadable: {exc}") from exc
            maps[result.file] = m
            if len(maps) > _OPEN_MAPS:
                maps.popitem(last=False)[1].close()
        elif next(reversed(maps)) != result.file:
            maps.move_to_end(result.file)
        return m[result.offset : result.offset + result.length]


#: Result files a `ResultReader` keeps mapped at once: enough for the files an export in input
#: order moves between (a chunk's output and errors, and the chunks its retried rows went in).
_OPEN_MAPS = 16


def _error_line(custom_id: str | None, code: str, message: str) -> bytes:
    return orjson.dumps(
        {"id": None, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}
    )


__all__ += ["is_retryable_status", "export", "output_lines", "output_paths"]
