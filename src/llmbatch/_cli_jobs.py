"""The job commands of the CLI: run, estimate, resume, jobs, status, cancel, results, wait."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import click
import orjson

from ._cli_engine import ENGINE_HELP, engine_config_options, engine_options
from ._exceptions import ConfigError
from ._rows import check_row, iter_lines
from .engines import resolve_engine
from .jobs import (
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    JobRunner,
    JobSettings,
    JobStore,
    default_job_root,
    export,
    find_job,
    list_jobs,
    make_provider,
    open_job,
)
from .jobs._progress import make_progress
from .jobs._run import (
    JobLock,
    cancel_batches,
    ingest_new_rows,
    price_table,
    record_settings,
    run_parts,
    settings_for,
    stored_job,
)
from .pricing import Estimate, PriceTable, estimate_row
from .providers import PROVIDER_NAMES

__all__ = ["register"]


def _say(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _print_estimate(est: Estimate, table: PriceTable, billed: bool, *, err: bool = True) -> None:
    if billed:
        est.cost(table)
    for line in est.summary_lines():
        click.echo(line, err=err)
    if not billed:
        click.echo("Cost: none (the local provider bills nothing).", err=err)


def _run_job(
    store: JobStore, job_dir: Path, api_key: str | None, *, dry_run: bool = False, settings: JobSettings | None = None
) -> int:
    # The lock covers ingesting and planning too: a second process re-ingesting (DELETE FROM rows)
    # or planning chunks while the first runs would corrupt the job.
    with JobLock(job_dir):
        if settings is not None:
            n = record_settings(store, settings)
            if n:
                _say(f"chunking limits changed: re-planning {n} chunks not sent yet")
        return _run_job_locked(store, job_dir, api_key, dry_run=dry_run)


def _run_job_locked(store: JobStore, job_dir: Path, api_key: str | None, *, dry_run: bool = False) -> int:
    job, settings = stored_job(store)
    report = ingest_new_rows(store, job, settings)
    if report is not None:
        _say(f"job {job['id']}: {report.rows:,} rows read, {report.invalid:,} invalid")
        for p in report.problems or []:
            click.echo(f"  {p}", err=True)
        if report.invalid > len(report.problems or []):
            click.echo(f"  ... and {report.invalid - len(report.problems or []):,} more", err=True)
    invalid = store.counts()["invalid"]
    if invalid and not settings.skip_invalid:
        raise ConfigError(
            f"{invalid} invalid rows (listed above; `llmbatch status {job['id']}` shows them again); nothing was sent. "
            "Fix them, or run again with --skip-invalid to send the valid rows"
        )
    provider, prices, est = run_parts(store, job_dir, settings, api_key)
    _print_estimate(est, prices, provider.billed)
    if dry_run:
        runner = JobRunner(store, job_dir, settings, provider, prices=prices, say=_say)
        runner.plan()
        for ch in store.chunks(("planned",)):
            click.echo(
                f"{ch.tag}: {ch.rows} rows, {ch.bytes:,} bytes, {ch.endpoint}, model {ch.model}, "
                f"~{ch.est_input:,} input tokens, est. ${ch.est_cost:.4f}"
            )
        return EXIT_OK

    progress = make_progress(_say, live=sys.stderr.isatty())
    runner = JobRunner(store, job_dir, settings, provider, prices=prices, progress=progress)

    async def main() -> int:
        await provider.start()
        try:
            outcome = await runner.run()
        finally:
            await provider.aclose()
            progress.close()
        click.echo(outcome.summary, err=True)
        return outcome.code

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: remote batches keep running. Resume with: llmbatch resume {job['id']}", err=True)
        return EXIT_INTERRUPTED


_api_key_option = click.option(
    "--api-key", default=None, help="The provider's API key [env: the provider's, e.g. OPENAI_API_KEY]."
)
_job_root_option = click.option(
    "--job-dir",
    "job_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where jobs live [default: $LLMBATCH_HOME/jobs].",
)


def register(cli: click.Group) -> None:
    """Adds the job commands to the CLI group."""

    @cli.command()
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option(
        "--provider",
        type=click.Choice(PROVIDER_NAMES),
        default=None,
        help="Where batches run [default: a provider/ prefix on --model or the rows' model, else local, "
        "an in-process llmbatch server]; openai is any OpenAI-compatible Batch API.",
    )
    @click.option(
        "--model",
        default=None,
        help="Send every row with this model (an Azure deployment name); a provider/ prefix picks the provider.",
    )
    @click.option("--api-version", default=None, help="azure: dated API version [env OPENAI_API_VERSION; unset: v1].")
    @click.option("--engine", default="auto", show_default=True, help=f"local: {ENGINE_HELP}")
    @engine_options
    @click.option(
        "--completion-window", default="24h", show_default=True, help="Window asked of the provider (OpenAI: only 24h)."
    )
    @click.option("--base-url", default=None, help="The provider's API base URL [env: its own, e.g. OPENAI_BASE_URL].")
    @_api_key_option
    @click.option(
        "-o",
        "--output",
        type=click.Path(path_type=Path),
        default=None,
        help="Results file [default: INPUT.results.jsonl next to the first input].",
    )
    @click.option(
        "--errors", type=click.Path(path_type=Path), default=None, help="Final failures [default: INPUT.errors.jsonl]."
    )
    @_job_root_option
    @click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Most requests per remote batch.")
    @click.option("--max-bytes", type=click.IntRange(min=1), default=None, help="Largest chunk file in bytes.")
    @click.option("--max-in-flight", type=click.IntRange(min=1), default=None, help="Most remote batches at once.")
    @click.option(
        "--max-enqueued-tokens",
        type=click.IntRange(min=1),
        default=None,
        help="Most estimated prompt tokens in flight per model.",
    )
    @click.option(
        "--direct-below",
        type=click.IntRange(min=0),
        default=None,
        help="Send the last N pending rows through the direct API instead of another batch.",
    )
    @click.option(
        "--max-attempts",
        type=click.IntRange(min=1),
        default=3,
        show_default=True,
        help="Tries per row before a retryable failure is final.",
    )
    @click.option(
        "--max-cost",
        type=click.FloatRange(min=0),
        default=None,
        help="USD cap: stop before the next submission's estimate would pass it.",
    )
    @click.option("--skip-invalid", is_flag=True, help="Send the valid rows even if some are invalid.")
    @click.option(
        "--keep-uploads",
        is_flag=True,
        help="Keep each chunk's uploaded input at the provider (default: deleted once collected).",
    )
    @click.option("--dry-run", is_flag=True, help="Validate, estimate, print the planned chunks, send nothing.")
    @click.option(
        "--poll-interval", type=click.FloatRange(min=0.01), default=None, help="First wait between polls (s)."
    )
    @click.option(
        "--price-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="JSON prices overriding the bundled table.",
    )
    @click.option("--price-as", default=None, help="Price every row as this model (e.g. an Azure deployment's model).")
    @click.option("--price-input", type=float, default=None, help="USD per 1M input tokens for unpriced models.")
    @click.option("--price-output", type=float, default=None, help="USD per 1M output tokens for unpriced models.")
    def run(inputs: tuple[Path, ...], api_key: str | None, job_root: Path | None, dry_run: bool, **opts: Any) -> None:
        """Run OpenAI-format batch JSONL files as one durable job; re-running resumes it."""
        opts["engine_options"] = engine_config_options(opts) or None
        settings = settings_for(list(inputs), **opts)
        if settings.provider == "local":
            notice = resolve_engine(opts["engine"])[1]
            if notice:
                _say(f"note: {notice}")
        store, job_dir, created = open_job(list(inputs), settings, job_root or default_job_root())
        _say(f"{'new' if created else 'resuming'} job {job_dir.name} ({job_dir})")
        try:
            sys.exit(_run_job(store, job_dir, api_key, dry_run=dry_run, settings=settings))
        finally:
            store.close()

    @cli.command()
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option(
        "--default-output-tokens",
        type=click.IntRange(min=1),
        default=1024,
        show_default=True,
        help="Output tokens assumed for rows that set no max_tokens.",
    )
    @click.option(
        "--price-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="JSON prices overriding the bundled table.",
    )
    @click.option("--price-as", default=None, help="Price every row as this model (e.g. an Azure deployment's model).")
    @click.option("--price-input", type=float, default=None, help="USD per 1M input tokens for unpriced models.")
    @click.option("--price-output", type=float, default=None, help="USD per 1M output tokens for unpriced models.")
    @click.option("--provider", type=click.Choice(PROVIDER_NAMES), default=None, help="Price at this provider's rates.")
    def estimate(
        inputs: tuple[Path, ...],
        default_output_tokens: int,
        price_file: Path | None,
        price_input: float | None,
        price_output: float | None,
        provider: str | None,
        price_as: str | None,
    ) -> None:
        """Validate rows and estimate tokens and cost, offline; sends nothing.

        Exits 2 when some rows are invalid (each is listed with its file and line).
        """
        est = Estimate()
        invalid = 0
        for path in inputs:
            for line_no, raw in iter_lines(path):
                if not raw.strip():
                    continue
                obj, problems = check_row(raw)
                if problems or obj is None:
                    invalid += 1
                    if invalid <= 50:
                        reason = "; ".join(f"{p.code}: {p.message}" for p in problems)
                        click.echo(f"{path}:{line_no}: {reason}", err=True)
                    continue
                body = obj["body"]
                est.add(body["model"], estimate_row(obj["url"], body, default_output_tokens=default_output_tokens))
        table = price_table(price_file, price_input, price_output, est.by_model, provider, price_as)
        _print_estimate(est, table, billed=True, err=False)
        if invalid:
            click.echo(f"{invalid} invalid rows (not counted above)", err=True)
            sys.exit(EXIT_USAGE)

    @cli.command()
    @click.argument("job")
    @_api_key_option
    @_job_root_option
    def resume(job: str, api_key: str | None, job_root: Path | None) -> None:
        """Resume a job by id."""
        store, job_dir = find_job(job, job_root or default_job_root())
        try:
            sys.exit(_run_job(store, job_dir, api_key))
        finally:
            store.close()

    @cli.command()
    @click.argument("job")
    @_api_key_option
    @_job_root_option
    def wait(job: str, api_key: str | None, job_root: Path | None) -> None:
        """Block until a job ends (running it if no other process is); exit with run's codes."""
        store, job_dir = find_job(job, job_root or default_job_root())
        try:
            while True:
                try:
                    sys.exit(_run_job(store, job_dir, api_key))
                except ConfigError as exc:
                    if "already running" not in str(exc):
                        raise
                time.sleep(2)
        finally:
            store.close()

    @cli.command()
    @_job_root_option
    def jobs(job_root: Path | None) -> None:
        """List jobs, newest first."""
        for j in list_jobs(job_root or default_job_root()):
            c = j["counts"]
            total = sum(c.values())
            inputs = ", ".join(Path(i["path"]).name for i in j["inputs"])
            click.echo(
                f"{j['id']}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(j['created_at']))}  {j['status']:<14} "
                f"{c['succeeded']}/{total} succeeded, {c['failed'] + c['invalid']} failed  {inputs}"
            )

    @cli.command()
    @click.argument("job")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @_job_root_option
    def status(job: str, as_json: bool, job_root: Path | None) -> None:
        """Rows done / failed / pending, remote batches by state, tokens and cost."""
        store, _job_dir = find_job(job, job_root or default_job_root())
        try:
            j, _settings = stored_job(store)
            chunks = store.batches_by_state()
            est = store.db.execute(
                "SELECT COALESCE(SUM(est_input),0), COALESCE(SUM(est_output),0) FROM rows WHERE state!='invalid'"
            ).fetchone()
            data = {
                "id": j["id"], "status": j["status"], "inputs": [i["path"] for i in j["inputs"]],
                "rows": store.counts(), "batches": chunks, "usage": store.totals(),
                "estimate": {"input_tokens": est[0], "output_tokens": est[1],
                             "cost": store.estimated_cost()},
            }  # fmt: skip
            if as_json:
                click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
                return
            r = data["rows"]
            click.echo(f"job {j['id']} ({j['status']})")
            click.echo(
                f"  rows: {r['succeeded']} succeeded, {r['failed']} failed, {r['invalid']} invalid, "
                f"{r['pending'] + r['queued']} pending"
            )
            click.echo(f"  batches: {', '.join(f'{n} {s}' for s, n in sorted(chunks.items())) or 'none'}")
            u = data["usage"]
            click.echo(
                f"  tokens: {int(u['input_tokens']):,} in / {int(u['output_tokens']):,} out "
                f"(estimate {est[0]:,} / up to {est[1]:,}); cost ${u['cost']:.4f}"
            )
            for at, kind, _chunk, message in store.events(10):
                click.echo(f"  {time.strftime('%H:%M:%S', time.localtime(at))} {kind}: {message}")
        finally:
            store.close()

    @cli.command()
    @click.argument("job")
    @_api_key_option
    @_job_root_option
    def cancel(job: str, api_key: str | None, job_root: Path | None) -> None:
        """Cancel a job's remote batches; finished rows are kept (`llmbatch results` exports them)."""
        store, job_dir = find_job(job, job_root or default_job_root())
        try:
            j, settings = stored_job(store)
            provider = make_provider(settings, job_dir, api_key)
            runner = JobRunner(store, job_dir, settings, provider, say=_say)

            async def main() -> int:
                await provider.start()
                try:
                    return await cancel_batches(runner)
                finally:
                    await provider.aclose()

            with JobLock(job_dir):
                n = asyncio.run(main())
            out, _err = runner.export()
            _say(f"cancelled {n} remote batches; results so far in {out}")
        finally:
            store.close()

    @cli.command()
    @click.argument("job")
    @_job_root_option
    def results(job: str, job_root: Path | None) -> None:
        """Export a job's results again (one line per input row, in input order)."""
        store, job_dir = find_job(job, job_root or default_job_root())
        try:
            j, settings = stored_job(store)

            out, err = export(store, [Path(i["path"]) for i in j["inputs"]], settings)
            c = store.counts()
            _say(f"{out}: {sum(c.values())} rows ({c['succeeded']} succeeded)")
            failed = c["failed"] + c["invalid"]
            sys.exit(EXIT_FAILED_ROWS if failed else EXIT_OK)
        finally:
            store.close()
