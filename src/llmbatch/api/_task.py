"""Tasks: where requests come from, how each is built, and what happens to each answer.

    class Sentiment(BaseModel):
        label: Literal["positive", "negative", "neutral"]

    task = Task(
        "reviews",
        inputs=reviews,                                   # any iterable or generator
        request=lambda r: {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": r["text"]}]},
        output=Sentiment,                                 # structured output, validated
        process=lambda r, s: {"id": r["id"], "label": s.label},
        sink="labels.jsonl",
    )
    report = task.run()

Every request goes through an `AsyncBatchClient` (so batches, budgets, retries and re-runs work
as there: a task run again after a crash pays nothing twice). With `output=` a pydantic model,
the model's JSON schema goes out as `response_format` (strict JSON schema), and each answer is
parsed and validated; an answer that does not validate is asked again, with the validation
error shown to the model, up to `max_parse_attempts` times, and then counts as a failed row.
Results reach the sink in input order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import openai
import orjson
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ValidationError

from .._exceptions import ConfigError
from ._client import AsyncBatchClient

__all__ = ["Task", "TaskReport", "TaskRow", "response_format_for"]

In = TypeVar("In")


def response_format_for(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAI's `response_format` asking for JSON that matches `model` (strict JSON schema)."""
    try:
        from openai.lib._pydantic import to_strict_json_schema

        schema = to_strict_json_schema(model)
        strict = True
    except Exception:  # an SDK without the helper, or a model strict mode cannot express
        schema, strict = model.model_json_schema(), False
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": schema, "strict": strict}}


@dataclass
class TaskRow:
    """One input's outcome: `output` is what `process` returned (or the parsed answer), or `error`."""

    index: int
    input: Any
    output: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict[str, Any]:
        """The row as plain JSON-able data (pydantic models dumped)."""
        return {"index": self.index, "input": _plain(self.input), "output": _plain(self.output), "error": self.error}


@dataclass
class TaskReport:
    """What a task run produced, in input order (`rows` is empty when a sink took them)."""

    succeeded: int = 0
    failed: int = 0
    rows: list[TaskRow] = field(default_factory=list)
    sink: Path | None = None

    def to_pandas(self) -> Any:
        """The rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame([r.record() for r in self._all()])

    def to_polars(self) -> Any:
        """The rows as a polars DataFrame (needs polars)."""
        import polars as pl

        return pl.DataFrame([r.record() for r in self._all()])

    def _all(self) -> list[TaskRow]:
        if self.rows or self.sink is None:
            return self.rows
        with open(self.sink, "rb") as fh:
            return [TaskRow(**orjson.loads(line)) for line in fh if line.strip()]


class Task(Generic[In]):
    """A batch task: `inputs` -> `request(input)` -> the model -> `process(input, answer)` -> sink.

    `request` returns the keyword arguments of a chat completion (`model`, `messages`, ...).
    `output`: a pydantic model for structured outputs (the answer handed to `process` is then an
    instance of it); without it `process` gets the `ChatCompletion`. `process` defaults to
    returning the answer. `sink`: a JSONL path (one record per input, in input order:
    `{"index", "input", "output", "error"}`), or None to keep rows in the report.
    `window` bounds the inputs in flight at once, so a generator of millions stays in bounded
    memory. Other keyword arguments (`provider`, `config`, `max_cost`, `max_attempts`,
    `job_dir`, ...) go to the `AsyncBatchClient`; `name` names its job, so running the task
    again reuses everything already answered.
    """

    def __init__(
        self,
        name: str,
        inputs: Iterable[In],
        request: Callable[[In], dict[str, Any]],
        *,
        output: type[BaseModel] | None = None,
        process: Callable[[In, Any], Any] | None = None,
        sink: str | Path | None = None,
        max_parse_attempts: int = 3,
        window: int = 10_000,
        **client_options: Any,
    ) -> None:
        if max_parse_attempts < 1 or window < 1:
            raise ConfigError("max_parse_attempts and window must be at least 1")
        self.name = name
        self.inputs = inputs
        self.request = request
        self.output = output
        self.process = process
        self.sink = Path(sink) if sink is not None else None
        self.max_parse_attempts = max_parse_attempts
        self.window = window
        self.client_options = client_options

    def run(self) -> TaskReport:
        """Runs the task to its end and returns its report (blocking; fine inside Jupyter too)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun())
        # An event loop already runs in this thread (a notebook): run in a thread of our own.
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["report"] = asyncio.run(self.arun())
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        t = threading.Thread(target=target, name=f"llmbatch-task-{self.name}")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["report"]  # type: ignore[no-any-return]

    async def arun(self) -> TaskReport:
        """Runs the task to its end in the running event loop."""
        report = TaskReport(sink=self.sink)
        out = open(self.sink.with_name(self.sink.name + ".part"), "wb") if self.sink else None
        try:
            async with AsyncBatchClient(self.name, **self.client_options) as client:
                window: list[asyncio.Task[TaskRow]] = []

                def emit(row: TaskRow) -> None:
                    if row.ok:
                        report.succeeded += 1
                    else:
                        report.failed += 1
                    if out is not None:
                        out.write(orjson.dumps(row.record(), default=_plain) + b"\n")
                    else:
                        report.rows.append(row)

                for index, item in enumerate(self.inputs):
                    window.append(asyncio.ensure_future(self._one(client, index, item)))
                    if len(window) >= self.window:
                        emit(await window.pop(0))
                for pending in window:
                    emit(await pending)
        finally:
            if out is not None:
                out.close()
        if self.sink is not None:
            self.sink.with_name(self.sink.name + ".part").replace(self.sink)
        return report

    async def _one(self, client: AsyncBatchClient, index: int, item: In) -> TaskRow:
        row = TaskRow(index, item)
        try:
            params = dict(self.request(item))
        except Exception as exc:  # the user's request builder: one bad input is one failed row
            row.error = f"request(input) raised {type(exc).__name__}: {exc}"
            return row
        if self.output is not None:
            params.setdefault("response_format", response_format_for(self.output))
        answer: Any = None
        for attempt in range(1, self.max_parse_attempts + 1):
            try:
                completion = await client.chat.completions.create(**params)
            except (openai.APIError, ConfigError) as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                return row
            if self.output is None:
                answer = completion
                break
            text = _content(completion)
            try:
                answer = self.output.model_validate_json(text or "")
                break
            except ValidationError as exc:
                problem = _brief(exc)
                if attempt == self.max_parse_attempts:
                    row.error = f"the answer did not match {self.output.__name__} after {attempt} tries: {problem}"
                    return row
                # Ask again, showing the model its answer and what was wrong with it.
                params = {
                    **params,
                    "messages": [
                        *params["messages"],
                        {"role": "assistant", "content": text or ""},
                        {
                            "role": "user",
                            "content": f"That answer does not match the required JSON schema ({problem}). "
                            "Answer again with only the JSON.",
                        },
                    ],
                }
        try:
            row.output = self.process(item, answer) if self.process is not None else answer
        except Exception as exc:
            row.error = f"process(input, answer) raised {type(exc).__name__}: {exc}"
        return row


def _content(completion: ChatCompletion) -> str | None:
    choices = completion.choices or []
    return choices[0].message.content if choices else None


def _brief(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or "the answer"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', str(exc))}{more}"


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, ChatCompletion):
        return value.model_dump(mode="json")
    return value
