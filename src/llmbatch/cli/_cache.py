"""`llmbatch cache stats|clear|export`: the response cache that jobs run with `--cache` share."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import orjson

from ..jobs import ResponseCache, default_cache_path
from ._options import cache_path_option, say

__all__ = ["cache"]


def _open(cache_path: Path | None) -> ResponseCache:
    return ResponseCache(cache_path or default_cache_path())


@click.group()
def cache() -> None:
    """The response cache that jobs run with --cache share (stats, clear, export)."""


@cache.command()
@cache_path_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def stats(cache_path: Path | None, as_json: bool) -> None:
    """Answers kept, bytes stored and on disk, answers taken, and answers by who gave them."""
    with _open(cache_path) as c:
        s = c.stats()
    if as_json:
        data = {
            "path": str(s.path), "entries": s.entries, "stored_bytes": s.stored_bytes, "file_bytes": s.file_bytes,
            "hits": s.hits, "cost": s.cost,
            "by_scope": s.by_scope,
        }  # fmt: skip
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"cache {s.path}")
    click.echo(
        f"  {s.entries:,} answers, {s.stored_bytes:,} bytes stored (bound {s.max_size:,} unless a job sets "
        f"--cache-max-size), {s.file_bytes:,} bytes on disk"
    )
    click.echo(f"  {s.hits:,} hits; the answers cost ${s.cost:.4f} when paid for")
    for scope, n in sorted(s.by_scope.items()):
        click.echo(f"  {scope}: {n:,} answers")


@cache.command()
@cache_path_option
def clear(cache_path: Path | None) -> None:
    """Delete every answer (jobs then send every row again)."""
    with _open(cache_path) as c:
        n = c.clear()
        path = c.path
    say(f"cleared {n:,} answers from {path}")


@cache.command()
@cache_path_option
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File [default: stdout]."
)
def export(cache_path: Path | None, output: Path | None) -> None:
    """Every answer as a JSON line: key, scope, endpoint, model, usage, cost, times, result."""
    with _open(cache_path) as c:
        out = open(output, "wb") if output is not None else sys.stdout.buffer  # noqa: SIM115
        try:
            n = 0
            for record in c.export():
                out.write(orjson.dumps(record) + b"\n")
                n += 1
        finally:
            if output is not None:
                out.close()
    if output is not None:
        say(f"{n:,} answers written to {output}")
