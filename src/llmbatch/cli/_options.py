"""What the job commands share: options, the message line, the estimate printout."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .._exceptions import ConfigError
from .._text import parse_duration, parse_size
from ..jobs import default_job_root
from ..pricing import Estimate

__all__ = [
    "AGE",
    "DURATION",
    "SIZE",
    "api_key_option",
    "cache_option",
    "cache_path_option",
    "job_root_option",
    "price_options",
    "print_estimate",
    "root_of",
    "say",
]

F = TypeVar("F", bound=Callable[..., Any])


def say(message: str) -> None:
    """A message line on stderr, with the time."""
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def print_estimate(est: Estimate, *, billed: bool, err: bool = True) -> None:
    """The estimate's summary lines (costed already when `billed`)."""
    for line in est.summary_lines():
        click.echo(line, err=err)
    if not billed:
        click.echo("Cost: none (the local provider bills nothing).", err=err)


def root_of(given: Path | None) -> Path:
    """Where jobs live: as given (`--job-dir`), else `$LLMBATCH_HOME/jobs`."""
    return given or default_job_root()


class _Size(click.ParamType):
    """A size in bytes, given as `2GB`, `500MiB` or a bare number of bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
        if size <= 0:
            self.fail(f"{value!r} is not a positive size", param, ctx)
        return size


SIZE = _Size()


class _Duration(click.ParamType):
    """A duration in seconds, given as `90s`, `30m`, `6h`, `1d`, `2w` or a bare number in `bare`
    units; `positive`: 0 is refused."""

    name = "duration"

    def __init__(self, *, bare: str = "s", positive: bool = True) -> None:
        self.bare, self.positive = bare, positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            seconds = parse_duration(str(value), bare=self.bare)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)
        if self.positive and seconds <= 0:
            self.fail(f"{value!r} is not a positive duration", param, ctx)
        return seconds


DURATION = _Duration()


def cache_option(help: str) -> Callable[[F], F]:
    """`--cache [deterministic|all|off]` (a bare `--cache` is deterministic), saying `help`."""
    return click.option(
        "--cache",
        type=click.Choice(["deterministic", "all", "off"]),
        is_flag=False,
        flag_value="deterministic",
        default=None,
        help=help,
    )


cache_path_option = click.option(
    "--cache-path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The response cache's SQLite file [default: $LLMBATCH_HOME/cache.sqlite].",
)


#: An age: a bare number is days (`jobs prune --older-than 7`), 0 allowed.
AGE = _Duration(bare="d", positive=False)

api_key_option = click.option(
    "--api-key", default=None, help="The provider's API key [env: the provider's, e.g. OPENAI_API_KEY]."
)
job_root_option = click.option(
    "--job-dir",
    "job_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where jobs live [default: $LLMBATCH_HOME/jobs].",
)

_PRICE_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--price-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="JSON prices overriding the bundled table.",
    ),
    click.option("--price-as", default=None, help="Price every row as this model (e.g. an Azure deployment's model)."),
    click.option("--price-input", type=float, default=None, help="USD per 1M input tokens for unpriced models."),
    click.option("--price-output", type=float, default=None, help="USD per 1M output tokens for unpriced models."),
]


def price_options(f: F) -> F:
    """--price-file, --price-as, --price-input, --price-output."""
    for option in reversed(_PRICE_OPTIONS):
        f = option(f)
    return f
