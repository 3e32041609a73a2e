"""`llmbatch estimate`: rows validated and estimated offline, by the same code as `run`; sends nothing."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from .._text import plural
from ..jobs import (
    EXIT_USAGE,
    JobSettings,
    JobStore,
    ResponseCache,
    RowRules,
    answer_from_cache,
    cache_scope,
    default_cache_path,
    ingest,
    price_table,
    provider_of,
)
from ..pricing import LONG_PROMPT_TOKENS, Estimate
from ..providers import PROVIDER_NAMES, provider_class
from ._options import cache_option, cache_path_option, price_options, print_estimate

__all__ = ["estimate"]

#: Invalid rows listed by line; the rest are counted.
_SHOWN_PROBLEMS = 50


@click.command()
# Inputs are checked by `ingest`, as `run` checks them: one line, the same words.
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--default-output-tokens",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Output tokens assumed for rows that set no max_tokens.",
)
@price_options
@click.option(
    "--provider",
    type=click.Choice(PROVIDER_NAMES),
    default=None,
    help="Price at this provider's rates, and check rows by its rules too [default: the one `run` picks: "
    "a provider/ prefix on the rows' model, else local, which bills nothing].",
)
@click.option("--model", default=None, help="Estimate the rows as sent as this model, as `run --model` sends them.")
@click.option("--base-url", default=None, help="With --cache: the provider's base URL `run` is given.")
@cache_option(
    "Leave out the rows `run --cache` would answer from the response cache (saying what they cost when "
    "first answered) and the rows repeating an earlier row; the cache is only read."
)
@cache_path_option
def estimate(
    inputs: tuple[Path, ...],
    default_output_tokens: int,
    price_file: Path | None,
    price_input: float | None,
    price_output: float | None,
    provider: str | None,
    price_as: str | None,
    model: str | None,
    base_url: str | None,
    cache: str | None,
    cache_path: Path | None,
) -> None:
    """Validate rows and estimate tokens and cost, offline; sends nothing.

    Exits 2 when some rows are invalid (each is listed with its file and line).
    """
    paths = list(inputs)
    named = provider is not None
    # The provider `run` would use: rows without a provider/ prefix run locally, at no cost.
    provider = provider or provider_of(paths)
    rules = RowRules(provider=provider, model=model, default_output_tokens=default_output_tokens)
    # The rows go through `run`'s own reading and checking, into a scratch store: memory
    # stays flat however large the input, and run and estimate cannot disagree.
    with tempfile.TemporaryDirectory(prefix="llmbatch-estimate-") as tmp:
        store = JobStore(Path(tmp) / "estimate.sqlite")
        try:
            report = ingest(store, paths, rules, max_problems=_SHOWN_PROBLEMS)
            if cache not in (None, "off"):
                _look_up(store, JobSettings(provider=provider, model=model, base_url=base_url, cache=cache), cache_path)
            est = Estimate.from_totals(store.estimate_by_model(LONG_PROMPT_TOKENS))
            est.cached_rows, est.cached_cost = store.from_cache()
            est.repeated_rows = store.held_repeats()
        finally:
            store.close()
    for problem in report.problems or []:
        click.echo(problem, err=True)
    # Prices given with no provider named are for pricing these rows: they are used.
    priced = price_file is not None or price_input is not None or price_output is not None or price_as is not None
    bills = provider_class(provider).billed
    billed = bills or (priced and not named)
    if billed:
        at = provider if bills else None  # prices given for rows that would run locally: as given
        est.cost(price_table(price_file, price_input, price_output, est.by_model, at, price_as))
    print_estimate(est, billed=billed, err=False)
    if not billed and not named:
        click.echo("To price these rows at a provider's batch rates instead, name it: --provider openai (or another).")
    if report.invalid:
        click.echo(f"{plural(report.invalid, 'invalid row')} (not counted above)", err=True)
        sys.exit(EXIT_USAGE)


def _look_up(store: JobStore, settings: JobSettings, cache_path: Path | None) -> None:
    """Marks the rows the response cache answers, and the rows repeating an earlier row, as `run
    --cache` would (in the scratch store; the cache's answers are not marked used). No cache file
    yet: no row is answered from it."""
    path = cache_path or default_cache_path()
    if path.is_file():
        with ResponseCache(path) as cache:
            answer_from_cache(store, cache, cache_scope(settings), sampled=settings.cache == "all")
    store.hold_repeats()
