"""Checking the downloaded result files that rows point into, and downloading damaged ones again.

Rows keep their results as (file, offset, length) references into the files `collect`
downloaded, so a file cut short, deleted or changed afterwards would export lines that are not
JSON, or another row's answer, without a word. Each file's size and sha256 are recorded when it
is downloaded, before any row points into it; the size is checked before each export and each
run, the hash before each export (hashing is ~0.1 s per 55 MB). A damaged file is downloaded
again from the provider by its recorded file id (`repair`, at the start and end of a run).

Files recorded before llmbatch kept sizes and hashes (job store schema 1) are checked only for
existing and being long enough for the lines rows point at; their hash is not recorded on a
later read, since that would vouch for a file nobody checked. Downloaded again, they get both.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import NamedTuple

import orjson

from .._exceptions import DamagedResults, ProviderError
from ._context import RunContext
from ._records import ResultFile
from ._store import JobStore

__all__ = ["Damage", "check_results", "damaged_results", "digest", "find_damage", "repair", "result_file_name"]

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_BLOCK = 1 << 20


def result_file_name(tag: str, file_id: str) -> str:
    """The name a chunk's downloaded result file gets under the job's `results/`."""
    return f"{tag}-{_SAFE_NAME.sub('_', file_id)}.jsonl"


def digest(path: Path, *, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file; with `fsync`, also flushes it to disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
            size += len(block)
        if fsync:
            os.fsync(fh.fileno())
    return size, h.hexdigest()


class Damage(NamedTuple):
    """A damaged result file: its record, where it is, and what is wrong with it."""

    file: ResultFile
    path: Path
    problem: str


def find_damage(store: JobStore, *, hashes: bool = True) -> list[Damage]:
    """The result files rows point into that are missing, of another size than downloaded,
    shorter than the lines rows point at, or (with `hashes`) of other contents."""
    root = store.path.parent
    found: list[Damage] = []
    for f in store.referenced_result_files():
        path = root / f.path
        problem = None
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problem = "missing"
        except OSError as exc:
            problem = f"unreadable ({exc.strerror})"
        else:
            if f.size is not None and size != f.size:
                change = "cut short" if size < f.size else "grown"
                problem = f"{change}: {size:,} bytes, {f.size:,} when downloaded"
            elif size < f.extent:
                problem = f"cut short: {size:,} bytes, rows point up to byte {f.extent:,}"
            elif hashes and f.sha256 is not None and digest(path)[1] != f.sha256:
                problem = "changed since it was downloaded (same size, another sha256)"
        if problem is not None:
            found.append(Damage(f, path, problem))
    return found


def damaged_results(store: JobStore, damage: list[tuple[Damage, str]]) -> DamagedResults:
    """The error naming each damaged file, what is wrong with it and (`damage`'s second item)
    what to do about it."""
    job = store.job() or {}
    rows = sum(d.file.rows for d, _ in damage)
    lines = "\n  ".join(f"{d.path}: {d.problem}{'; ' + todo if todo else ''}" for d, todo in damage)
    return DamagedResults(
        f"job {job.get('id', '?')}: {len(damage)} downloaded result file(s) that {rows:,} rows point into "
        f"are damaged, so nothing was exported:\n  {lines}",
        files={str(d.path): d.problem for d, _ in damage},
    )


def check_results(store: JobStore, *, hashes: bool = True) -> None:
    """Raises DamagedResults when a result file rows point into is damaged (see `find_damage`)."""
    damage = find_damage(store, hashes=hashes)
    if damage:
        job_id = (store.job() or {}).get("id", "JOB")
        todo = f"`llmbatch resume {job_id}` downloads it again from the provider while it still has it"
        raise damaged_results(store, [(d, todo) for d in damage])


async def repair(ctx: RunContext, *, hashes: bool = True) -> int:
    """Downloads every damaged result file again from the provider, re-pointing its rows when
    its bytes came back different; returns how many. Raises DamagedResults naming the files
    that could not be restored (the provider no longer has them, or they lack rows' results)."""
    damage = find_damage(ctx.store, hashes=hashes)
    lost: list[tuple[Damage, str]] = []
    for d in damage:
        try:
            await _download_again(ctx, d)
        except ProviderError as exc:
            todo = (
                f"could not download it again ({exc}); try `llmbatch resume {ctx.job_id}` later"
                if exc.retryable
                else f"the provider no longer has it ({exc}): restore the file from a backup"
            )
            lost.append((d, todo))
        except _Incomplete as exc:
            lost.append((d, str(exc)))
        else:
            ctx.say(f"{d.path}: {d.problem}; downloaded it again from the provider")
    if lost:
        raise damaged_results(ctx.store, lost)
    if damage:  # what was downloaded must now pass the full check
        check_results(ctx.store)
    return len(damage)


class _Incomplete(Exception):
    """A file downloaded again lacks results that rows point at."""


async def _download_again(ctx: RunContext, d: Damage) -> None:
    store = ctx.store
    file_id = d.file.file_id or await _recorded_file_id(ctx, d)
    tmp = d.path.with_name(d.path.name + ".again")
    d.path.parent.mkdir(parents=True, exist_ok=True)
    await ctx.provider.download(file_id, tmp)
    size, sha256 = digest(tmp, fsync=True)
    if (size, sha256) == (d.file.size, d.file.sha256):
        os.replace(tmp, d.path)
        return
    # Other bytes: a provider that translates its results (Anthropic, Gemini) stamps the time
    # in them, and a file recorded before hashes has nothing to compare. Each row's line is
    # found again by its custom_id, as `collect` first found it.
    found: dict[str, tuple[int, int]] = {}
    with open(tmp, "rb") as fh:
        end = 0
        for raw in fh:
            start, end = end, end + len(raw)
            line = raw.rstrip(b"\r\n")
            try:
                custom_id = orjson.loads(line)["custom_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if isinstance(custom_id, str):
                found.setdefault(custom_id, (start, len(line)))
    lines: list[tuple[int, int, int]] = []
    missing = 0
    for idx, custom_id, _remote_id in store.refs_into(d.file.id):
        at = found.get(custom_id) if custom_id is not None else None
        if at is None:
            missing += 1
        else:
            lines.append((*at, idx))
    if missing:
        tmp.unlink(missing_ok=True)
        raise _Incomplete(f"downloaded again from the provider, it lacks the results of {missing:,} rows")
    # Killed between these two steps, the file is new and its rows still point at the old
    # offsets: the next check finds the hash differs and downloads it again.
    os.replace(tmp, d.path)
    store.repoint(d.file.id, size, sha256, lines)


async def _recorded_file_id(ctx: RunContext, d: Damage) -> str:
    """The provider's id of a file recorded before file ids were: asked of its chunk's batch,
    the one whose name `collect` gave the file."""
    chunk = next((c for c in ctx.store.chunks() if c.id == d.file.chunk_id), None)
    if chunk is not None and chunk.batch_id:
        batch = await ctx.provider.get_batch(chunk.batch_id)
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id and result_file_name(chunk.tag, file_id) == d.path.name:
                return file_id
    raise ProviderError(f"no file of the provider's is known to be {d.path.name}", status=404)
