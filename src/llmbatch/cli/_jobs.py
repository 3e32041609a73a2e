"""The commands on existing jobs: resume, wait, jobs, status, cancel, results."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import click
import orjson

from .._exceptions import JobBusy, LLMBatchError
from .._text import plural
from ..jobs import EXIT_FAILED_ROWS, EXIT_OK, EXIT_USAGE, JobSession, list_jobs, prune_jobs, remove_job
from ._options import AGE, api_key_option, job_root_option, root_of, say
from ._run import run_job

__all__ = ["cancel", "jobs", "results", "resume", "status", "wait"]

#: Seconds between tries of `wait` while another process runs the job.
_WAIT_POLL = 2.0


@click.command()
@click.argument("job")
@api_key_option
@job_root_option
def resume(job: str, api_key: str | None, job_root: Path | None) -> None:
    """Resume a job by id."""
    with JobSession.find(job, root_of(job_root), api_key=api_key, say=say) as session:
        sys.exit(run_job(session))


@click.command()
@click.argument("job")
@api_key_option
@job_root_option
def wait(job: str, api_key: str | None, job_root: Path | None) -> None:
    """Block until a job ends (running it if no other process is); exit with run's codes."""
    with JobSession.find(job, root_of(job_root), api_key=api_key, say=say) as session:
        while True:
            try:
                sys.exit(run_job(session))
            except JobBusy:
                time.sleep(_WAIT_POLL)


@click.group(invoke_without_command=True)
@job_root_option
@click.pass_context
def jobs(ctx: click.Context, job_root: Path | None) -> None:
    """List jobs, newest first; `jobs rm JOB...` removes jobs, `jobs prune` old ones."""
    ctx.obj = job_root
    if ctx.invoked_subcommand is not None:
        return
    for j in list_jobs(root_of(job_root)):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"]))
        if "damaged" in j:
            click.echo(f"{j['id']}  {when}  DAMAGED        {j['damaged']}")
            continue
        c = j["counts"]
        total = sum(c.values())
        inputs = ", ".join(Path(i["path"]).name for i in j["inputs"])
        click.echo(
            f"{j['id']}  {when}  {j['state']:<14} "
            f"{c['succeeded']}/{total} succeeded, {c['failed'] + c['invalid']} failed  {inputs}"
        )


def _root(ctx: click.Context, job_root: Path | None) -> Path:
    """--job-dir given after the subcommand, else before it (`jobs --job-dir D rm ...`)."""
    return root_of(job_root or ctx.obj)


@jobs.command("rm")
@click.argument("job_ids", nargs=-1, required=True, metavar="JOB...")
@click.option(
    "--force",
    is_flag=True,
    help="Remove a job even while batches of it still run at its provider: they are left running there "
    "(billed; results never collected). Without it, `llmbatch cancel JOB` first.",
)
@job_root_option
@click.pass_context
def remove(ctx: click.Context, job_ids: tuple[str, ...], force: bool, job_root: Path | None) -> None:
    """Remove jobs: each one's store, chunk and result files (the results files next to its inputs stay)."""
    root = _root(ctx, job_root)
    failed = 0
    for job in job_ids:
        try:
            r = remove_job(job, root, force=force)
        except LLMBatchError as exc:
            click.echo(f"error: {exc}", err=True)
            failed += 1
            continue
        say(f"removed job {job} ({r.dir})")
        if r.left_running:
            say(f"left running at the provider: {', '.join(r.left_running)}")
    if failed:
        sys.exit(EXIT_USAGE)


@jobs.command("prune")
@click.option(
    "--older-than",
    type=AGE,
    default="7d",
    show_default=True,
    help="Idle for longer than this: a number with s, m, h, d or w (30m, 12h, 7d).",
)
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@job_root_option
@click.pass_context
def prune(ctx: click.Context, older_than: float, dry_run: bool, job_root: Path | None) -> None:
    """Remove jobs idle for a while that finished or never sent anything.

    Jobs stopped part-way, budget-stopped, cancelled, running or damaged are kept (they can
    be resumed or looked at); `jobs rm` removes those.
    """
    removed = prune_jobs(_root(ctx, job_root), older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        say(f"{verb} job {r.id} ({r.reason}; {r.dir})")
    say(f"{verb} {plural(len(removed), 'job')}" + ("" if removed else " (none finished or unsent and idle that long)"))


@click.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@job_root_option
def status(job: str, as_json: bool, job_root: Path | None) -> None:
    """Rows done / failed / pending, remote batches by state, tokens and cost."""
    with JobSession.find(job, root_of(job_root)) as session:
        store = session.store
        j, settings = session.stored()
        chunks = store.batches_by_state()
        est_in, est_out = store.estimated_tokens()
        by_provider: dict[str, dict[str, int]] = {}
        for lane, model, state, n in store.lane_counts():
            # The job's own provider without --model: its rows' models, under the provider's name.
            name = settings.answered_by(lane, model if lane or settings.model else None)
            by_provider.setdefault(name, {})[state] = by_provider.get(name, {}).get(state, 0) + n
        data = {
            "id": j["id"], "status": j["status"], "inputs": [i["path"] for i in j["inputs"]],
            "rows": store.counts(), "rows_by_provider": by_provider,
            "batches": chunks, "usage": store.totals(), "from_cache": store.from_cache()[0],
            "answered_in_running_batches": store.answered_in_running_batches()[0],
            "estimate": {"input_tokens": est_in, "output_tokens": est_out, "cost": store.estimated_cost()},
        }  # fmt: skip
        if as_json:
            click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
            return
        r = data["rows"]
        click.echo(f"job {j['id']} ({j['status']})")
        inside = data["answered_in_running_batches"]
        click.echo(
            f"  rows: {r['succeeded']} succeeded, {r['failed']} failed, {r['invalid']} invalid, "
            f"{r['pending'] + r['queued']} pending"
            + (f" ({inside} of them answered in batches still running, collected when each ends)" if inside else "")
        )
        if settings.fallbacks:
            for name, states in by_provider.items():
                done = ", ".join(f"{n} {s if s != 'queued' else 'in flight'}" for s, n in sorted(states.items()))
                click.echo(f"    {name}: {done}")
        cached, saved = store.from_cache()
        if cached:
            click.echo(f"  from the cache: {cached} of the succeeded rows, not sent (${saved:.4f} when first paid for)")
        click.echo(f"  batches: {', '.join(f'{n} {s}' for s, n in sorted(chunks.items())) or 'none'}")
        u = data["usage"]
        click.echo(
            f"  tokens: {int(u['input_tokens']):,} in / {int(u['output_tokens']):,} out "
            f"(estimate {est_in:,} / up to {est_out:,}); cost ${u['cost']:.4f}"
        )
        for at, kind, _chunk, message in store.events(10):
            click.echo(f"  {time.strftime('%H:%M:%S', time.localtime(at))} {kind}: {message}")


@click.command()
@click.argument("job")
@api_key_option
@job_root_option
def cancel(job: str, api_key: str | None, job_root: Path | None) -> None:
    """Cancel a job's remote batches; finished rows are kept (`llmbatch results` exports them)."""
    with JobSession.find(job, root_of(job_root), api_key=api_key, say=say) as session:
        with session.lock:
            n = asyncio.run(session.cancel())
        out, _err = session.export()
        say(f"cancelled {n} remote batches; results so far in {out}")


@click.command()
@click.argument("job")
@job_root_option
def results(job: str, job_root: Path | None) -> None:
    """Export a job's results again (one line per input row, in input order)."""
    with JobSession.find(job, root_of(job_root)) as session:
        out, _err = session.export()
        c = session.store.counts()
        say(f"{out}: {sum(c.values())} rows ({c['succeeded']} succeeded)")
        sys.exit(EXIT_FAILED_ROWS if c["failed"] + c["invalid"] else EXIT_OK)
