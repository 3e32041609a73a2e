"""The `llmbatch` group: one module per command, each registered here with `add_command`.

Errors become one clean line and a non-zero exit code.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from .._exceptions import LLMBatchError
from ._cache import cache
from ._dashboard import dashboard
from ._estimate import estimate
from ._jobs import cancel, jobs, results, resume, status, wait
from ._run import run
from ._serve import serve

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmbatch")
def cli() -> None:
    """Run large numbers of LLM requests cheaply and reliably."""


for _command in (serve, run, estimate, resume, wait, jobs, status, cancel, results, cache, dashboard):
    cli.add_command(_command)


def main() -> None:
    """Entry point: runs the CLI, turning llmbatch errors into one line and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except LLMBatchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
