"""`llmbatch run`: OpenAI-format batch JSONL files run as one durable job (re-running resumes it)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from ..engines import engine_options as check_engine_options
from ..engines import resolve_engine
from ..jobs import EXIT_INTERRUPTED, EXIT_OK, JobSession, JobSettings, make_progress, settings_for
from ..providers import PROVIDER_NAMES
from ._engine_options import ENGINE_HELP, EngineOptionsCommand, engine_config_options, engine_options
from ._options import (
    DURATION,
    SIZE,
    api_key_option,
    cache_option,
    cache_path_option,
    job_root_option,
    price_options,
    print_estimate,
    root_of,
    say,
)

__all__ = ["run", "run_job"]

_SKIP_HINT = "run again with --skip-invalid"


def run_job(session: JobSession, settings: JobSettings | None = None, *, dry_run: bool = False) -> int:
    """Runs the job to its end on this terminal; returns `llmbatch run`'s exit code.

    The lock covers reading the inputs and planning too: a second process re-reading them or
    planning chunks while the first runs would corrupt the job.
    """
    with session.lock:
        prepared = session.prepare(settings, skip_hint=_SKIP_HINT)
        print_estimate(prepared.estimate, billed=prepared.provider.billed)
        if dry_run:
            for ch in session.dry_run(prepared):
                click.echo(
                    f"{ch.tag}: {ch.rows} rows, {ch.bytes:,} bytes, {ch.endpoint}, model {ch.model}, "
                    f"~{ch.est_input:,} input tokens, est. ${ch.est_cost:.4f}"
                )
            return EXIT_OK
        progress = make_progress(say, live=sys.stderr.isatty())
        runner = session.runner(prepared, progress)
        try:
            outcome = asyncio.run(session.run(runner))
        except KeyboardInterrupt:
            progress.close()  # the live block ends before the last word, not after it
            click.echo(
                f"\ninterrupted: {prepared.provider.after_interrupt}. Resume with: llmbatch resume {session.id}",
                err=True,
            )
            return EXIT_INTERRUPTED
        except BaseException:
            progress.close()
            raise
        progress.close()
        click.echo(outcome.summary, err=True)
        return outcome.code


@click.command(cls=EngineOptionsCommand)
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
@click.option(
    "--s3-uri", default=None, help="bedrock: s3://bucket/prefix for inputs and outputs [env LLMBATCH_BEDROCK_S3_URI]."
)
@click.option("--role-arn", default=None, help="bedrock: IAM role the jobs run as [env LLMBATCH_BEDROCK_ROLE_ARN].")
@click.option(
    "--gcs-uri", default=None, help="vertex: gs://bucket/prefix for inputs and outputs [env LLMBATCH_VERTEX_GCS_URI]."
)
@click.option("--engine", default="auto", show_default=True, help=f"local: {ENGINE_HELP}")
@engine_options
@click.option(
    "--echo-latency",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="echo: seconds added per request (a demo of a run's progress without a model).",
)
@click.option(
    "--upstream-url", default=None, help="openai: base URL of the OpenAI-compatible API it forwards to, with /v1."
)
@click.option(
    "--upstream-api-key",
    envvar="LLMBATCH_UPSTREAM_API_KEY",
    default=None,
    help="openai: key sent upstream [env LLMBATCH_UPSTREAM_API_KEY]; never stored (resume: --api-key or the env).",
)
@click.option(
    "--completion-window", default="24h", show_default=True, help="Window asked of the provider (OpenAI: only 24h)."
)
@click.option("--base-url", default=None, help="The provider's API base URL [env: its own, e.g. OPENAI_BASE_URL].")
@api_key_option
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
@job_root_option
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
    "--no-direct",
    "direct",
    flag_value=False,
    default=None,
    help="Never use the direct API: refuse rows too few for a batch (Bedrock: fewer than 100 per model).",
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
@cache_option(
    "Answer rows from the response cache shared by jobs, and keep new answers there: "
    "`--cache` (deterministic) for rows at temperature 0 or with a seed, `--cache all` for sampled rows too."
)
@cache_path_option
@click.option(
    "--cache-max-size",
    type=SIZE,
    default=None,
    help="Most bytes the cache stores, e.g. 500MB; the answers used least recently go first [default: 2GB].",
)
@click.option(
    "--fallback",
    "fallbacks",
    multiple=True,
    metavar="PROVIDER/MODEL",
    help="Repeatable. Rows that fail for good at the provider for a reason another may not have (expired, "
    "cancelled, 5xx, quota) go to this one, as this model; a 400 does not fail over. Key and base URL "
    "from its environment (e.g. ANTHROPIC_API_KEY).",
)
@click.option(
    "--fallback-after",
    type=DURATION,
    default=None,
    help="Cancel a batch not finished after this long (e.g. 6h) and send the rows it has not answered "
    "to the next --fallback; rows it answered are kept.",
)
@click.option("--skip-invalid", is_flag=True, help="Send the valid rows even if some are invalid.")
@click.option(
    "--keep-uploads",
    is_flag=True,
    help="Keep each chunk's uploaded input at the provider (default: deleted once collected).",
)
@click.option("--dry-run", is_flag=True, help="Validate, estimate, print the planned chunks, send nothing.")
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=None,
    help="First wait between polls (s), doubling to 60 s. [default: 2; local: 0.5]",
)
@price_options
def run(inputs: tuple[Path, ...], api_key: str | None, job_root: Path | None, dry_run: bool, **opts: Any) -> None:
    """Run OpenAI-format batch JSONL files as one durable job; re-running resumes it.

    \b
    Exit codes: 0 every row succeeded; 1 some rows finally failed (outputs written);
    2 usage, configuration or invalid input; 3 the budget stopped the job; 130 Ctrl+C.
    """
    upstream_url, upstream_key = opts.pop("upstream_url"), opts.pop("upstream_api_key")
    # The upstream URL is an engine option (and part of the job's identity); its key is not
    # stored: the local provider takes it as its key, as `resume --api-key` gives it again.
    config = {**engine_config_options(opts), **({"upstream_url": upstream_url} if upstream_url else {})}
    opts["engine_options"] = config or None
    echo_latency = opts.pop("echo_latency")
    if echo_latency:  # only when given, like the other engine options (the job's id hashes them)
        opts["engine_options"] = {**(opts["engine_options"] or {}), "echo_latency": echo_latency}
    settings = settings_for(list(inputs), **opts)
    api_key = api_key or (upstream_key if settings.provider == "local" else None)
    if settings.provider == "local":
        notice = resolve_engine(opts["engine"])[1]
        if notice:
            say(f"note: {notice}")
        check_engine_options(settings.engine, settings.engine_options)  # options this engine does not take are an error
    session, created = JobSession.open(list(inputs), settings, root_of(job_root), api_key=api_key, say=say)
    say(f"{'new' if created else 'resuming'} job {session.id} ({session.dir})")
    with session:
        try:
            code = run_job(session, settings, dry_run=dry_run)
        except BaseException:
            if session.forget_if_unused():  # a new job refused before it sent anything is not kept
                say(f"job {session.id} not kept: nothing was sent")
            raise
        sys.exit(code)
