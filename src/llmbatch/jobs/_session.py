"""One driver for a job: the steps every front end (the CLI, `run_file`/`Job`, the batching
client) takes to run one, in one place.

    JobSession.open(inputs, settings) or .find(job id)
      -> lock -> prepare(settings): record them, ingest, refuse invalid rows, estimate
      -> runner(progress) -> run() | dry_run() | cancel() -> export()

The front ends differ only in how they report (terminal lines or log records); what a run
does, which job it finds and the errors it raises are decided here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._exceptions import ConfigError, InvalidRows, JobBusy
from .._paths import llmbatch_home
from .._rows import input_stat, iter_lines
from .._text import plural
from ..pricing import LONG_PROMPT_TOKENS, Estimate, PriceTable
from ..providers import Provider, create_provider, provider_class, split_model
from ._cache import ResponseCache, answer_from_cache, cache_scope, keep_earlier_answers
from ._export import export
from ._failover import Lane, lane_settings
from ._ingest import IngestReport, RowRules, ingest
from ._lock import JobLock, lock_held
from ._progress import LiveProgress, PlainProgress
from ._records import Chunk
from ._runner import JobRunner, RunOutcome
from ._settings import PROVIDER_OPTIONS, JobSettings
from ._store import JobStore

__all__ = [
    "CHUNKING",
    "JobSession",
    "check_config",
    "Prepared",
    "default_job_root",
    "job_id_for",
    "make_provider",
    "price_table",
    "provider_started",
    "settings_for",
]

#: Settings that shape chunks: when they change between runs, unsent chunks are re-planned.
CHUNKING = ("batch_size", "max_bytes", "max_enqueued_tokens")
#: Settings that make a job's identity, with the inputs.
_IDENTITY_SETTINGS = ("provider", "base_url", "engine", "model")
#: Invalid rows named in the error that refuses to run a job (and in the note of skipped ones).
SHOWN_PROBLEMS = 20


def default_job_root() -> Path:
    return llmbatch_home() / "jobs"


def settings_for(
    inputs: list[Path], *, provider: str | None = None, base_url: str | None = None, **options: Any
) -> JobSettings:
    """A job's settings from `run`'s options (None: not given).

    The provider is the one named, else a `provider/` prefix on the model or the first row's
    model, else `local`; the base URL the one given, else the provider's environment variable.
    """
    provider = provider or provider_of(inputs, options.get("model"))
    cls = provider_class(provider)
    env = getattr(cls, "base_url_env", None)
    base_url = base_url or (os.environ.get(env) if env else None)
    return JobSettings(provider=provider, base_url=base_url, **{k: v for k, v in options.items() if v is not None})


def provider_of(inputs: list[Path], model: str | None = None) -> str:
    """The provider a job on `inputs` runs on when none is named: a `provider/` prefix on
    `model` or the first row's model, else `local` (`run` and `estimate` agree)."""
    return _provider_of_model(model, inputs) or "local"


def _provider_of_model(model: str | None, inputs: list[Path]) -> str | None:
    """The provider named by the model's prefix, else by the first row's model (`anthropic/claude-...`)."""
    if model:
        return split_model(model, None)[0]
    for path in inputs[:1]:
        try:
            for _n, raw in iter_lines(path):
                if raw.strip():
                    body = orjson.loads(raw).get("body") or {}
                    m = body.get("model") if isinstance(body, dict) else None
                    return split_model(m, None)[0] if isinstance(m, str) else None
        except (OSError, orjson.JSONDecodeError, AttributeError):
            return None  # the row is reported with its line when the job reads it
    return None


def _describe_inputs(inputs: list[Path]) -> list[dict[str, Any]]:
    described = []
    for p in inputs:
        st = input_stat(p)
        described.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return described


def job_id_for(inputs: list[dict[str, Any]], settings: JobSettings) -> str:
    """The job's id: the same inputs run the same way give the same id."""
    identity: list[Any] = [getattr(settings, k) for k in _IDENTITY_SETTINGS]
    if settings.engine_options:  # only when given, so jobs from before engine options keep their ids
        identity.append(settings.engine_options)
    key = orjson.dumps([inputs, identity], option=orjson.OPT_SORT_KEYS)
    return "job_" + hashlib.sha256(key).hexdigest()[:16]


def check_config(settings: JobSettings, job_dir: Path, api_key: str | None = None) -> None:
    """What can be checked before a job exists: the provider (its SDK, its key) and, for the
    local provider, its engine and the engine's options. Raises ConfigError."""
    make_provider(settings, job_dir, api_key)
    if settings.provider == "local":
        RowRules.of(settings)  # makes the engine (not started): its options are checked
    for lane in range(1, len(settings.fallbacks) + 1):  # each fallback's SDK and key too
        fallback = lane_settings(settings, lane)
        make_provider(fallback, job_dir, api_key if fallback.provider == settings.provider else None)


def make_provider(settings: JobSettings, job_dir: Path, api_key: str | None = None) -> Provider:
    """The provider a job runs on. Keys come from the argument, then the provider's environment
    variable. On the local provider with the openai engine, the key is the one sent upstream
    (default LLMBATCH_UPSTREAM_API_KEY): keys are never stored with a job."""
    options = {k: v for k in PROVIDER_OPTIONS if (v := getattr(settings, k))}
    engine_config = settings.local_engine_options()
    if settings.provider == "local" and settings.engine == "openai":
        upstream_key = api_key or os.environ.get("LLMBATCH_UPSTREAM_API_KEY")
        if upstream_key:
            engine_config = {**engine_config, "upstream_api_key": upstream_key}
    return create_provider(
        settings.provider, api_key=api_key, base_url=settings.base_url, job_dir=job_dir, engine=settings.engine,
        engine_config=engine_config, **options,
    )  # fmt: skip


def price_table(
    price_file: Path | None,
    price_input: float | None,
    price_output: float | None,
    models: Iterable[str],
    provider: str | None = None,
    price_as: str | None = None,
) -> PriceTable:
    """The bundled prices on `provider`, overridden by a price file, `price_as` pricing every model
    as that one, and flags pricing the models still unpriced."""
    models = list(models)
    table = PriceTable.load(price_file).for_provider(provider).priced_as(models, price_as)
    if price_input is not None or price_output is not None:
        if price_input is None or price_output is None:
            raise ConfigError("--price-input and --price-output go together (USD per 1M tokens)")
        for model in models:
            if table.lookup(model) is None:
                table = table.with_override(model, input=price_input, output=price_output)
    return table


@contextlib.asynccontextmanager
async def provider_started(provider: Provider) -> AsyncIterator[Provider]:
    """The provider started for the block (its clients, or the local server), closed after it."""
    await provider.start()
    try:
        yield provider
    finally:
        await provider.aclose()


@dataclass
class Prepared:
    """A job ready to run: its record and settings, its provider (not started), prices and estimate."""

    job: dict[str, Any]
    settings: JobSettings
    provider: Provider
    prices: PriceTable
    estimate: Estimate
    #: What reading the inputs found, when this run read them (None: an earlier run did).
    ingest: IngestReport | None = None
    #: The response cache, when the job runs with one (the session closes it).
    cache: ResponseCache | None = None
    #: The providers rows fail over to, in order (`--fallback`), not started.
    fallbacks: list[Lane] = field(default_factory=list)


class JobSession:
    """One job, opened for a front end: its store, its lock and the steps of running it.

    The session's store connection belongs to the thread that opened it: a run in another
    thread opens a session of its own (`JobSession(job_dir)`).
    """

    def __init__(self, job_dir: Path, *, api_key: str | None = None, say: Callable[[str], None] = print) -> None:
        db = job_dir / "job.sqlite"
        if not db.exists():
            raise ConfigError(f"no job in {job_dir}: `llmbatch jobs` lists them")
        self.dir = job_dir
        self.api_key = api_key
        self.say = say
        self.store = JobStore(db)
        self.lock = JobLock(job_dir)
        self.cache: ResponseCache | None = None
        #: Whether this session created the job (`open`): a failed first run then removes it.
        self.new = False

    @classmethod
    def open(
        cls,
        inputs: list[Path],
        settings: JobSettings,
        job_root: Path,
        *,
        api_key: str | None = None,
        say: Callable[[str], None] = print,
    ) -> tuple[JobSession, bool]:
        """Opens the job for these inputs, creating it when new; returns (session, created).

        An existing job keeps its stored settings until `prepare` records new ones (flags such
        as --max-cost may change between runs) under the job's lock.
        """
        described = _describe_inputs(inputs)
        job_dir = job_root / job_id_for(described, settings)
        check_config(settings, job_dir, api_key)  # before the job exists: a refused one leaves none
        job_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(job_dir / "job.sqlite")
        try:
            created = store.job() is None
            if created:
                store.create_job(job_dir.name, described, settings.model_dump(mode="json"))
        finally:
            store.close()
        session = cls(job_dir, api_key=api_key, say=say)
        session.new = created
        return session, created

    @classmethod
    def find(
        cls, job: str, job_root: Path, *, api_key: str | None = None, say: Callable[[str], None] = print
    ) -> JobSession:
        """Opens an existing job by id (or its directory)."""
        job_dir = Path(job) if Path(job).is_dir() else job_root / job
        if not (job_dir / "job.sqlite").exists():
            raise ConfigError(f"no job {job!r} under {job_root}: `llmbatch jobs` lists them")
        return cls(job_dir, api_key=api_key, say=say)

    @classmethod
    def named(
        cls,
        name: str,
        settings: JobSettings,
        job_root: Path,
        *,
        api_key: str | None = None,
        say: Callable[[str], None] = print,
    ) -> JobSession:
        """Opens, creating it when new, a job of calls made through the Python API: it has no
        input files, and its name is its id. Its provider cannot change between runs."""
        job_dir = job_root / name
        check_config(settings, job_dir, api_key)  # before the name is taken: a refused one takes none
        job_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(job_dir / "job.sqlite")
        try:
            job = store.job()
            if job is not None and (was := job["settings"].get("provider")) != settings.provider:
                if store.sent_anything():
                    raise ConfigError(
                        f"job {name!r} has sent requests on the {was} provider, so it cannot move to "
                        f"{settings.provider}: use another job name, or remove it first with "
                        f"`llmbatch jobs rm {name}` (its stored results go with it)"
                    )
                # Nothing was ever sent (a try that failed, say without a key): nothing is lost.
                if lock_held(job_dir):
                    raise JobBusy(f"job {name!r} is in use by another client; close it first")
                store.close()
                shutil.rmtree(job_dir)
                job_dir.mkdir(parents=True)
                store = JobStore(job_dir / "job.sqlite")
                job = None
            if job is None:
                store.create_job(name, [], settings.model_dump(mode="json"))
        finally:
            store.close()
        return cls(job_dir, api_key=api_key, say=say)

    @property
    def id(self) -> str:
        return self.dir.name

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        self.store.close()

    def __enter__(self) -> JobSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def stored(self) -> tuple[dict[str, Any], JobSettings]:
        """The job's record and the settings stored with it."""
        job = self.store.job()
        if job is None:
            raise ConfigError(f"{self.store.path} holds no job: it was created but never initialised; delete it")
        return job, JobSettings.model_validate(job["settings"])

    def inputs(self) -> list[Path]:
        return [Path(i["path"]) for i in self.stored()[0]["inputs"]]

    def invalid_rows(self, limit: int = SHOWN_PROBLEMS) -> list[str]:
        """`FILE:LINE: reason` of the first `limit` invalid rows."""
        inputs = self.inputs()
        found = []
        for file_no, line, error in self.store.first_invalid(limit):
            where = f"{inputs[file_no]}:{line}" if file_no >= 0 else "a call"
            found.append(f"{where}: {error}")
        return found

    # -- running (under the lock) -----------------------------------------------------------

    def prepare(self, settings: JobSettings | None = None, *, skip_hint: str = "pass --skip-invalid") -> Prepared:
        """Everything before sending: records `settings` (when given), reads and checks the
        inputs of a job not read yet, refuses invalid rows unless the job skips them, and
        makes the provider (not started), the prices and the estimate. The caller holds the lock.

        Raises InvalidRows (naming the first rows by file and line; `skip_hint` says how to
        send the valid ones anyway), ConfigError for bad settings or a missing key.
        """
        caches_anew = settings is not None and self._caches_anew(settings)
        if settings is not None:
            n = self._record_settings(settings)
            if n:
                self.say(f"chunking limits changed: re-planning {n} chunks not sent yet")
        job, settings = self.stored()
        report = self._ingest(job, settings)
        invalid = self.store.invalid_count()
        # Skipped invalid rows are named once, when they are read; refused ones every time.
        if invalid and (report is not None or not settings.skip_invalid):
            shown = self.invalid_rows()
            more = f"\n  ... and {invalid - len(shown):,} more" if invalid > len(shown) else ""
            if not settings.skip_invalid:
                raise InvalidRows(
                    f"{plural(invalid, 'invalid row')}; nothing was sent. "
                    f"Fix them, or {skip_hint} to send the valid rows:\n  " + "\n  ".join(shown) + more,
                    count=invalid,
                    problems=shown,
                )
            self.say("skipping the invalid rows (failed, in the errors file):\n  " + "\n  ".join(shown) + more)
        provider = make_provider(settings, self.dir, self.api_key)
        cache = self._answer_from_cache(settings, caches_anew)
        models = self.store.models(lane=0)
        prices = price_table(
            settings.price_file, settings.price_input, settings.price_output, models, settings.provider,
            settings.price_as,
        )  # fmt: skip
        estimate = Estimate.from_totals(self.store.estimate_by_model(LONG_PROMPT_TOKENS))
        estimate.cached_rows, estimate.cached_cost = self.store.from_cache()
        estimate.repeated_rows = self.store.held_repeats()
        if provider.billed:
            estimate.cost(prices)
        return Prepared(job, settings, provider, prices, estimate, report, cache, self.fallbacks(settings))

    def fallbacks(self, settings: JobSettings) -> list[Lane]:
        """The job's fallback providers (not started), each with its prices. A fallback of the job's
        own provider uses the job's key; another provider's key comes from its environment."""
        found = []
        for lane in range(1, len(settings.fallbacks) + 1):
            lane_s = lane_settings(settings, lane)
            key = self.api_key if lane_s.provider == settings.provider else None
            provider = make_provider(lane_s, self.dir, key)
            prices = price_table(
                settings.price_file, settings.price_input, settings.price_output, [lane_s.model or ""], lane_s.provider
            )
            found.append(Lane(lane_s, provider, prices))
        return found

    def _caches_anew(self, settings: JobSettings) -> bool:
        """Whether this run keeps answers in a cache the job's earlier runs did not keep theirs
        in (it ran without `--cache`, or with another cache or mode)."""
        job = self.store.job()
        if settings.cache == "off" or job is None:
            return False
        before = JobSettings.model_validate(job["settings"])
        return (before.cache, before.cache_path) != (settings.cache, settings.cache_path)

    def _answer_from_cache(self, settings: JobSettings, caches_anew: bool = False) -> ResponseCache | None:
        """Opens the response cache when the job runs with one, and answers from it every
        pending row it holds an answer for, before anything is planned. `caches_anew`: the job
        ran before without this cache, and the answers it got then are kept in it first (a
        finished job run again with `--cache` fills the cache for the next one)."""
        if settings.cache == "off":
            self.store.release_repeats(every=True)  # held by a run with the cache: sent after all
            return None
        if self.cache is None or self.cache.path != (settings.cache_path or self.cache.path):
            if self.cache is not None:
                self.cache.close()
            self.cache = ResponseCache(settings.cache_path, settings.cache_max_size)
        self.cache.max_size = settings.cache_max_size or self.cache.max_size
        if caches_anew and (kept := keep_earlier_answers(self.store, self.cache, settings, self.say)):
            self.say(f"cache: kept the answers of {kept:,} rows this job answered before it ran with this cache")
        try:
            n, saved = answer_from_cache(self.store, self.cache, cache_scope(settings), sampled=settings.cache == "all")
        except sqlite3.OperationalError as exc:  # a lock held past the timeout: a saving missed, not an error
            self.say(f"the response cache {self.cache.path} could not be read ({exc}); no rows answered from it")
            n, saved = 0, 0.0
        if n:
            self.say(
                f"cache: {n:,} rows answered from {self.cache.path}, not sent (they cost ${saved:.4f} when paid for)"
            )
        held = self.store.hold_repeats()
        if held:
            self.say(
                f"cache: {held:,} rows repeat an earlier row of this job; it is sent once and they take its answer"
            )
        return self.cache

    def _record_settings(self, settings: JobSettings) -> int:
        """Stores a run's settings with the job; returns how many unsent chunks went back to be
        re-planned because the chunking limits changed."""
        before = self.store.job()
        self.store.set_job(settings=settings.model_dump(mode="json"))
        old = JobSettings.model_validate(before["settings"]) if before else settings
        if any(getattr(old, k) != getattr(settings, k) for k in CHUNKING):
            return self.store.dissolve_planned()
        return 0

    def _ingest(self, job: dict[str, Any], settings: JobSettings) -> IngestReport | None:
        """Reads and checks the inputs of a job not read yet (None: an earlier run did)."""
        if job["status"] != "ingesting":
            return None
        self.store.clear_rows()  # an interrupted ingest starts over
        report = ingest(self.store, [Path(i["path"]) for i in job["inputs"]], settings)
        self.store.set_job(status="ingested")
        self.say(f"job {job['id']}: {plural(report.rows, 'row')} read, {report.invalid:,} invalid")
        return report

    def runner(self, prepared: Prepared, progress: PlainProgress | LiveProgress | None = None) -> JobRunner:
        return JobRunner(
            self.store, self.dir, prepared.settings, prepared.provider, prices=prepared.prices,
            progress=progress or PlainProgress(self.say), cache=prepared.cache, fallbacks=prepared.fallbacks,
        )  # fmt: skip

    def calls_runner(self, settings: JobSettings) -> JobRunner:
        """The runner of a job of calls (`named`): records `settings`, no inputs to read."""
        self._record_settings(settings)
        provider = make_provider(settings, self.dir, self.api_key)
        return JobRunner(self.store, self.dir, settings, provider, say=self.say, fallbacks=self.fallbacks(settings))

    def dry_run(self, prepared: Prepared) -> list[Chunk]:
        """Plans the chunks and sends nothing; returns the chunks planned so far."""
        self.runner(prepared).plan()
        return self.store.chunks(("planned",))

    async def run(self, runner: JobRunner) -> RunOutcome:
        """Runs the job to its end (or its budget) with its provider started."""
        async with provider_started(runner.ctx.provider):
            return await runner.run()

    async def cancel(self) -> int:
        """Cancels the job's remote batches and collects what they finished before the cancel;
        returns how many were cancelled. The caller holds the lock."""
        _job, settings = self.stored()
        provider = make_provider(settings, self.dir, self.api_key)
        runner = JobRunner(self.store, self.dir, settings, provider, say=self.say, fallbacks=self.fallbacks(settings))
        async with provider_started(provider):
            return await runner.cancel()

    def forget_if_unused(self) -> bool:
        """After a run that failed: removes the job when this session created it and it never
        sent anything, so a refused configuration or input (a bad engine option, invalid rows,
        an empty file) leaves no job to list or to resume. The caller has released the job's
        lock. Returns whether it was removed."""
        if not self.new:
            return False
        try:
            with self.lock:  # taken again: a process that took the job since keeps it
                if self.store.sent_anything():
                    return False
                self.store.close()
                shutil.rmtree(self.dir, ignore_errors=True)
        except JobBusy:
            return False
        return True

    def export(self, output: Path | None = None) -> tuple[Path, Path]:
        """Writes the results (and errors) files from the store; `output` overrides where."""
        job, settings = self.stored()
        if output is not None:
            settings = settings.model_copy(update={"output": output, "errors": None})
        return export(self.store, [Path(i["path"]) for i in job["inputs"]], settings)
