"""The steps every front end (the CLI, the Python API) takes to run a job, in one place.

    settings_for -> open_job -> JobLock -> record_settings -> ingest_new_rows
    -> (refuse invalid rows) -> run_parts -> JobRunner.run()  (or cancel_batches)

The front ends differ only in how they report (terminal lines or log records) and in the
error they raise for invalid rows; what a run does, and which job it finds, is decided here.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import orjson

from .._exceptions import ConfigError
from .._rows import iter_lines
from ..pricing import LONG_PROMPT_TOKENS, Estimate, PriceTable
from ..providers import Provider, provider_class, split_model
from . import make_provider
from ._ingest import IngestReport, ingest
from ._runner import JobRunner
from ._settings import JobSettings
from ._store import JobStore

__all__ = [
    "CHUNKING",
    "JobLock",
    "cancel_batches",
    "ingest_new_rows",
    "lock_held",
    "price_table",
    "provider_of_model",
    "record_settings",
    "run_parts",
    "settings_for",
    "stored_job",
]

#: Settings that shape chunks: when they change between runs, unsent chunks are re-planned.
CHUNKING = ("batch_size", "max_bytes", "max_enqueued_tokens")

#: How long taking the lock keeps trying: long enough to outlast a `lock_held` probe.
_LOCK_PATIENCE = 0.25


def settings_for(
    inputs: list[Path], *, provider: str | None = None, base_url: str | None = None, **options: Any
) -> JobSettings:
    """A job's settings from `run`'s options (None: not given).

    The provider is the one named, else a `provider/` prefix on the model or the first row's
    model, else `local`; the base URL the one given, else the provider's environment variable.
    """
    provider = provider or provider_of_model(options.get("model"), inputs) or "local"
    cls = provider_class(provider)
    env = getattr(cls, "base_url_env", None)
    base_url = base_url or (os.environ.get(env) if env else None)
    return JobSettings(provider=provider, base_url=base_url, **{k: v for k, v in options.items() if v is not None})


def provider_of_model(model: str | None, inputs: list[Path]) -> str | None:
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


class JobLock:
    """One process runs a job at a time; a second would break at-most-once submission.

    A `with` block takes and releases it. The Python API takes it in the calling thread (so
    that "already running" is raised there) and releases it in the thread that ran the job.
    """

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises ConfigError when another process (or Job) holds it."""
        fh = open(self.job_dir / "lock", "a+")  # noqa: SIM115 - held until release()
        deadline = time.monotonic() + _LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.close()
                    name = self.job_dir.name
                    raise ConfigError(
                        f"job {name} is already running in another process; `llmbatch wait {name}` waits for it"
                    ) from None
                time.sleep(0.02)
        self._fh = fh

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_held(job_dir: Path) -> bool:
    """Whether some process (this one included) is running the job now.

    It can only be told by taking the lock for an instant; `JobLock.acquire` waits out such
    an instant, so a probe never makes a starting run fail.
    """
    with open(job_dir / "lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def stored_job(store: JobStore) -> tuple[dict[str, Any], JobSettings]:
    """The job's record and the settings stored with it."""
    job = store.job()
    if job is None:
        raise ConfigError(f"{store.path} holds no job: it was created but never initialised; delete it")
    return job, JobSettings.model_validate(job["settings"])


def record_settings(store: JobStore, settings: JobSettings) -> int:
    """Stores a run's settings with the job (under its lock); returns how many unsent chunks
    went back to be re-planned because the chunking limits changed."""
    before = store.job()
    store.set_job(settings=settings.model_dump(mode="json"))
    old = JobSettings.model_validate(before["settings"]) if before else settings
    if any(getattr(old, k) != getattr(settings, k) for k in CHUNKING):
        return store.dissolve_planned()
    return 0


def ingest_new_rows(store: JobStore, job: dict[str, Any], settings: JobSettings) -> IngestReport | None:
    """Reads and checks the inputs of a job not ingested yet (None: it was already)."""
    if job["status"] != "ingesting":
        return None
    with store.tx() as db:
        db.execute("DELETE FROM rows")  # an interrupted ingest starts over
    report = ingest(store, [Path(i["path"]) for i in job["inputs"]], settings)
    store.set_job(status="ingested")
    return report


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


def run_parts(
    store: JobStore, job_dir: Path, settings: JobSettings, api_key: str | None
) -> tuple[Provider, PriceTable, Estimate]:
    """The provider (not started), the price table and the estimate of an ingested job."""
    provider = make_provider(settings, job_dir, api_key)
    models = store.models()
    prices = price_table(
        settings.price_file, settings.price_input, settings.price_output, models, settings.provider, settings.price_as
    )
    return provider, prices, Estimate.from_totals(store.estimate_by_model(LONG_PROMPT_TOKENS))


async def cancel_batches(runner: JobRunner) -> int:
    """Cancels the job's remote batches (its provider started) and collects what they finished
    before the cancel; returns how many were cancelled. The caller holds the job's lock."""
    n = await runner.cancel()
    while runner.store.chunks(("submitted",)):
        await runner.poll()
        await asyncio.sleep(runner.settings.poll_interval)
    return n
