"""The job runner: input rows in, exactly one result per row out, whatever happens between.

    ingest (validate + estimate every row) -> plan chunks under the limits -> for each chunk:
    record intent -> upload (tagged) -> record intent -> create batch (tagged) -> poll ->
    download results -> rows succeeded / back to pending / failed -> ... -> export in input order

Each step is a module of its own (`_planner`, `_submit`, `_collect`, `_direct`, `_export`);
this one runs them in a loop. Every step is recorded in the job store before and after its
remote call, so a run killed at any instant resumes from the store: a chunk left in
`uploading` or `creating` is first looked up by its tag (list and match), and only created
when the provider has none. A chunk never gets two remote batches.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .._exceptions import ConfigError, ProviderError
from ..pricing import PriceTable, Tariff
from ..providers import Provider, RemoteStatus
from ._cache import ResponseCache, answer_from_cache, cache_scope, keep_answers
from ._collect import poll, release_uploads
from ._context import RunContext
from ._direct import run_direct
from ._export import export
from ._failover import Lane, check_lanes, cut_overdue, move_failed
from ._planner import plan
from ._progress import LiveProgress, PlainProgress, Snapshot
from ._records import IN_FLIGHT, Chunk
from ._settings import JobSettings
from ._store import JobStore
from ._submit import audit, reconcile, submit, write_chunk_file
from ._verify import repair

__all__ = [
    "EXIT_BUDGET",
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "JobRunner",
    "RunOutcome",
]

EXIT_OK, EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_BUDGET, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_TERMINAL = {s.value for s in RemoteStatus if s.terminal}


@dataclass
class RunOutcome:
    """How a run ended: its exit code and a one-line summary."""

    code: int
    summary: str


class JobRunner:
    """Runs one job to its end, against its provider, then each of its fallbacks in turn for the
    rows the one before could not answer (`_failover.py`)."""

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
        cache: ResponseCache | None = None,
        fallbacks: Sequence[Lane] = (),
    ) -> None:
        self.progress = progress or PlainProgress(say)
        self.ctx = RunContext.of(store, job_dir, settings, provider, prices, self.progress.message, cache)
        # One context per provider, sharing the store; `ctx` is the one the job is on. Answers
        # from a fallback are not kept in the cache: its keys are of the rows as first sent.
        self.lanes = [self.ctx] + [
            RunContext.of(store, job_dir, f.settings, f.provider, f.prices, self.progress.message, lane=n)
            for n, f in enumerate(fallbacks, start=1)
        ]
        self._started: list[Provider] = []
        (job_dir / "chunks").mkdir(exist_ok=True)
        (job_dir / "results").mkdir(exist_ok=True)

    @property
    def store(self) -> JobStore:
        return self.ctx.store

    @property
    def settings(self) -> JobSettings:
        return self.ctx.settings

    @property
    def job_id(self) -> str:
        return self.ctx.job_id

    @property
    def budget_blocked(self) -> bool:
        """Whether the budget is holding back the next chunk."""
        return self.ctx.budget_blocked

    def poll_waits(self) -> tuple[float, float]:
        """(first, longest) wait between polls: the settings', within the provider's `max_poll_interval`."""
        cap = self.ctx.provider.max_poll_interval
        first, longest = self.settings.poll_interval, self.settings.max_poll_interval
        return (first, longest) if cap is None else (min(first, cap), min(longest, cap))

    def tariff(self, model: str, *, batch: bool = True) -> Tariff:
        return self.ctx.tariff(model, batch=batch)

    # -- the steps, one module each --------------------------------------------------------

    def plan(self, *, full_only: bool = False, limit: int | None = None, direct: bool = True) -> bool:
        return plan(self.ctx, full_only=full_only, limit=limit, direct=direct)

    async def reconcile(self) -> None:
        await reconcile(self.ctx)

    async def submit(self) -> bool:
        return await submit(self.ctx)

    async def poll(self) -> bool:
        return await poll(self.ctx)

    async def run_direct(self) -> bool:
        return await run_direct(self.ctx)

    def write_chunk_file(self, chunk: Chunk) -> Path:
        return write_chunk_file(self.ctx, chunk)

    def export(self) -> tuple[Path, Path]:
        """Writes the job's output and errors files (see `export`)."""
        return export(self.store, self.ctx.inputs, self.lanes[0].settings)

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> RunOutcome:
        """Plans, submits, polls and collects until every row is final (or the budget stops it)."""
        try:
            return await self._run()
        finally:
            for provider in self._started:
                await provider.aclose()
            self._started.clear()

    async def enter_lane(self, lane: int) -> None:
        """Moves the run to the provider of lane `lane`, starting it (the job's own provider is
        started by whoever runs the job)."""
        ctx = self.lanes[lane]
        if lane and ctx.provider not in self._started:
            await ctx.provider.start()
            self._started.append(ctx.provider)
        self.ctx = ctx

    async def fail_over(self) -> bool:
        """Sends the rows that failed at one provider for a reason the next may not have to the
        next (`_failover.py`); returns whether there were any."""
        lane = self.store.failover_lane(len(self.lanes) - 1)
        if lane is None:
            return False
        to = self.lanes[lane + 1]
        moved, refused = move_failed(self.store, self.ctx.inputs, to)
        self.ctx.say(
            f"failover: {moved} rows failed at {self.lanes[lane].settings.provider}; sending them to "
            f"{to.settings.provider}/{to.settings.model}"
            + (f" ({refused} more it cannot run stay failed)" if refused else "")
        )
        await self.enter_lane(lane + 1)
        return True

    async def _run(self) -> RunOutcome:
        await self.enter_lane(check_lanes(self.store, self.lanes[0].settings))
        await self.start()
        first, longest = self.poll_waits()
        delay = first
        while True:
            progressed = await self.round()
            if self._done():
                if await self.fail_over():
                    await self.start()
                    continue
                break
            if await self._budget_stopped():
                self.store.set_job(status="budget_stopped")
                await self.repair_results()
                return self._finish(budget_stopped=True)
            self.report()
            delay = first if progressed else min(delay * 1.5, longest)
            await asyncio.sleep(delay)
        self.store.set_job(status="finished")
        await self.repair_results()
        await release_uploads(self.ctx)
        return self._finish()

    async def repair_results(self, *, hashes: bool = True) -> int:
        """Downloads again the result files that were cut, deleted or changed since they were
        downloaded (`_verify.repair`); raises DamagedResults naming those the provider no
        longer has. Returns how many were downloaded again."""
        return await repair(self.ctx, hashes=hashes)

    def _check_prices(self) -> None:
        if self.settings.max_cost is None:
            return
        missing = [m for ctx in self.lanes for m in ctx.unpriced_models()]
        if missing:
            raise ConfigError(
                f"--max-cost needs prices, and there are none for {', '.join(missing)}: "
                "pass --price-file FILE or --price-input/--price-output (USD per 1M tokens)"
            )

    async def start(self) -> None:
        """Checks the prices a budget needs, sorts out what an earlier run left behind, then
        sends the first chunk at once."""
        self._check_prices()
        who = await self.ctx.provider.answered_by()
        if who:
            self.ctx.say(who)
        # A file of results cut or deleted since an earlier run: said (and downloaded again) now,
        # not after a run of hours. Only the sizes here; the export checks the hashes too.
        await self.repair_results(hashes=False)
        try:
            await self.reconcile()
        except ProviderError as exc:
            if not exc.retryable:
                raise
            # Not sure yet what an interrupted submission created: `submit` asks again each round.
            self.ctx.say(f"looking up earlier submissions failed: {exc}; will try again")
        try:
            # Batches the store lost (damaged, or restored from an older copy) are adopted
            # before anything is planned or sent; `submit` sends nothing until this has run.
            await audit(self.ctx)
        except ProviderError as exc:
            if not exc.retryable:
                raise
            self.ctx.say(f"listing the job's batches failed: {exc}; will try again")
        # One chunk first: the provider starts on it while the rest are planned and uploaded.
        first = self.plan(limit=1)
        self.store.set_job(status="running")
        if first:
            await self.submit()
            self.plan(direct=False)  # the same round: the rows left are not "the last few"
        await self.copy_cached_answers()

    async def answer_repeats(self) -> bool:
        """Rows held back as repeats of an earlier row (`JobStore.hold_repeats`) whose first row is
        final now: those whose answer the cache holds take it, the others (the first failed, or
        its answer could not be kept) are sent themselves. Returns whether any moved."""
        if not self.store.repeats_ready():
            return False
        own = self.lanes[0]
        answered = 0
        if own.cache is not None:
            scope, sampled = cache_scope(own.settings), own.settings.cache == "all"
            try:
                answered, _saved = await asyncio.to_thread(
                    answer_from_cache, self.store, own.cache, scope, sampled=sampled
                )
            except sqlite3.OperationalError as exc:  # a lock held past the timeout: they are sent instead
                self.ctx.say(f"the response cache {own.cache.path} could not be read ({exc})")
            await self.copy_cached_answers()
        released = self.store.release_repeats()
        if released:
            self.ctx.say(f"{released:,} rows repeat rows that got no answer to share; sending them too")
        return bool(answered or released)

    async def copy_cached_answers(self) -> None:
        """Copies in the answers rows took from the cache, while the provider starts on the first
        batch (`_cache.keep_answers`); any the cache lost since go back to pending, and are
        planned next round. The cache is a saving, not a duty: where it cannot be read (a lock
        held past the timeout, a damaged file), those rows are sent instead."""
        cache = self.lanes[0].cache
        try:
            lost = await asyncio.to_thread(keep_answers, self.store, cache)  # a connection of its own
        except sqlite3.Error as exc:
            if cache is None:
                raise
            self.ctx.say(f"the response cache {cache.path} could not be read ({exc}); sending the rows it answered")
            lost = await asyncio.to_thread(keep_answers, self.store, None)
        if lost:
            self.ctx.say(f"cache: {lost:,} answers went from the cache before they were copied; sending those rows")

    async def round(self, *, full_only: bool = False, poll: bool = True, direct: bool = True) -> bool:
        """One round of the steps: submit what is planned, poll (unless `poll` is False), plan
        (only full chunks with `full_only`), send the last few rows directly (when `direct`);
        returns whether anything moved."""
        await cut_overdue(self.ctx, self.ctx.lane < len(self.lanes) - 1)
        progressed = await self.submit()
        if poll:
            progressed |= await self.poll()
            progressed |= await self.answer_repeats()
        progressed |= self.plan(full_only=full_only)
        if direct:
            progressed |= await self.run_direct()
        return progressed

    def _done(self) -> bool:
        return not self.store.chunks((*IN_FLIGHT, "planned")) and not self.store.pending_count()

    async def _budget_stopped(self) -> bool:
        """Whether the budget holds back what is left, with nothing in flight that could free it."""
        if not self.ctx.budget_blocked or self.store.chunks(IN_FLIGHT):
            return False
        if self.store.chunks(("planned",)):
            # The batches whose estimates blocked the budget have finished, and their actual
            # cost (usually far below the estimate) now counts instead: look again.
            self.ctx.budget_blocked = False
            await self.submit()
            if self.store.chunks(IN_FLIGHT):
                return False
        return self.ctx.budget_blocked

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
        total = sum(c.values())
        # Rows finish inside a running batch long before it ends: its provider's counts (as last
        # polled) count them, so the figure moves as they finish, not only when a batch ends.
        running = self.store.chunks(("submitted",))
        answered, failed_running = self.store.answered_in_running_batches()
        final_failed = c["failed"] + c["invalid"]
        self.progress.update(
            Snapshot(
                total=total,
                done=min(total, c["succeeded"] + final_failed + answered),
                failed=final_failed + failed_running,
                batches=self.store.batches_by_state(("planned", *IN_FLIGHT)),
                spent=self.store.totals()["cost"],
                cap=self.settings.max_cost,
                unknown=sum(1 for ch in running if ch.id in self.ctx.progress_unknown),
            )
        )

    # -- cancelling ----------------------------------------------------------------------

    async def cancel(self) -> int:
        """Cancels every remote batch of the job, then collects what they finished before the
        cancel; returns how many were cancelled. The caller holds the job's lock."""
        try:
            await self.enter_lane(check_lanes(self.store, self.lanes[0].settings))
            return await self._cancel()
        finally:
            for provider in self._started:
                await provider.aclose()
            self._started.clear()

    async def _cancel(self) -> int:
        n = 0
        for chunk in self.store.chunks(("submitted",)):
            if chunk.batch_id and (chunk.remote_status or "") not in _TERMINAL:
                try:
                    await self.ctx.provider.cancel(chunk.batch_id)
                    n += 1
                except ProviderError as exc:
                    self.ctx.say(f"chunk {chunk.tag}: cancel failed: {exc}")
        self.store.set_job(status="cancelled")
        while self.store.chunks(("submitted",)):
            await self.poll()
            await asyncio.sleep(self.poll_waits()[0])
        return n
