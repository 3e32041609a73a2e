"""Offline token and cost estimates for batch rows, made before anything is spent.

`estimate_row` counts a request body's input tokens offline in its model's vocabulary
(o200k_base or cl100k_base: `llmbatch.pricing._tokens`) and sets its output tokens to the most
the request may generate, so that a budget check on the sum is conservative:

- chat: `max_completion_tokens`, else `max_tokens`; completions: `max_tokens` (OpenAI's
  default is 16 when absent); responses: `max_output_tokens`; all times `n` (and `best_of`
  for completions). Embeddings and moderations produce no output tokens.
- A request that sets no cap gets `default_output_tokens` (1024) per choice. That number is
  a guess, not a ceiling: such a request may generate far more. Set a cap on every row for a
  hard budget; `Estimate.summary_lines` says how many rows lack one.
- Reasoning models (o1/o3/o4 and gpt-5 families) bill their hidden reasoning tokens as
  output. Caps include those tokens, so a cap stays a true ceiling; without one the guess
  is `REASONING_OUTPUT_FACTOR` (4) times the default.

Input counting follows OpenAI's chat rule (3 tokens per message, its role and content, 1
more for a name, 3 to prime the reply; `_tokens` holds it), the rule the echo engine reports
too, so estimates of requests with string contents match its usage exactly. Approximations, all documented
where made: images are a fixed 765 tokens (85 at `detail: "low"`), OpenAI's count for a 1024x1024 image
on gpt-4o (patch-priced models such as gpt-4o-mini and gpt-4.1-mini count differently);
tools, functions and structured-output schemas are counted as their JSON text; audio and
file inputs are not estimated; prompt-cache hits are not predicted (all input is billed at
the uncached rate).

The per-row path is plain code (no pydantic, no regexes): a million-row job is estimated
before it starts. The tokenizer dominates; system prompts and tool schemas repeated across rows
are counted once (bench/bench_jobs.py measures rows per second).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..engines import CHAT, COMPLETIONS, EMBEDDINGS, MODERATIONS, RESPONSES
from ._prices import LONG_PROMPT_TOKENS, PriceTable, cost_at, normalize_model
from ._tokens import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, Tokenizer, tokenizer_for

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "REASONING_OUTPUT_FACTOR",
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "IMAGE_TOKENS",
    "IMAGE_TOKENS_LOW",
    "RowEstimate",
    "Estimate",
    "estimate_row",
    "is_reasoning_model",
]

#: Output tokens per choice assumed for a request with no output cap: a guess, not a ceiling.
DEFAULT_OUTPUT_TOKENS = 1024
#: Reasoning models spend hidden output tokens on thinking; their uncapped guess is this many times larger.
REASONING_OUTPUT_FACTOR = 4
#: OpenAI's `max_tokens` default for /v1/completions, so that endpoint always has a real ceiling.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: A 1024x1024 image at detail high/auto: 85 base + 4 tiles x 170 (OpenAI's gpt-4o rule).
IMAGE_TOKENS = 765
#: Any image at detail "low".
IMAGE_TOKENS_LOW = 85

_CHAT_TEXT_PARTS = frozenset({"text"})
_RESPONSES_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
# Binary inputs whose tokens cannot be known offline; counting their base64 as text would
# be wildly wrong, so they count 0 (documented above).
_UNCOUNTED_PARTS = frozenset({"input_audio", "file", "input_file", "audio"})
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_reasoning_cache: dict[str, bool] = {}


@dataclass(slots=True)
class RowEstimate:
    """Tokens of one request: input as counted, output as the most it may generate.

    `capped` is False when the request set no output cap, so `output_tokens` is a guess.
    """

    input_tokens: int
    output_tokens: int
    capped: bool = True


# -- counting helpers ------------------------------------------------------------------------


def _positive_int(value: Any) -> int | None:
    # `type(...) is int`: JSON true must not pass as 1.
    return value if type(value) is int and value > 0 else None


def is_reasoning_model(model: Any) -> bool:
    """Whether `model` belongs to a family that bills hidden reasoning tokens as output."""
    if type(model) is not str:
        return False
    hit = _reasoning_cache.get(model)
    if hit is None:
        key = normalize_model(model)
        hit = False
        for prefix in _REASONING_PREFIXES:
            # "o1", "o1-mini", "o3-2025-04-16", "gpt-5", "gpt-5.1", "gpt-5-mini"; not "o10x".
            if key.startswith(prefix) and (len(key) == len(prefix) or key[len(prefix)] in "-."):
                hit = True
                break
        if len(_reasoning_cache) < 1024:
            _reasoning_cache[model] = hit
    return hit


def _image_tokens(part: dict[str, Any]) -> int:
    # Chat nests detail in image_url ({"image_url": {"url", "detail"}}); Responses puts it on the part.
    detail = part.get("detail")
    if detail is None:
        image = part.get("image_url")
        if isinstance(image, dict):
            detail = image.get("detail")
    return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS


def _parts_tokens(tok: Tokenizer, parts: list[Any], text_types: frozenset[str]) -> int:
    """Tokens of a content-part array: text parts, images at a fixed size, the rest as JSON."""
    total = 0
    for part in parts:
        if type(part) is not dict:
            total += tok.count(part) if type(part) is str else tok.count_json(part)
            continue
        kind = part.get("type")
        if kind in text_types:
            text = part.get("text")
            total += tok.count(text) if type(text) is str else tok.count_json(text)
        elif kind in _IMAGE_PARTS:
            total += _image_tokens(part)
        elif kind == "refusal":
            text = part.get("refusal")
            if type(text) is str:
                total += tok.count(text)
        elif kind not in _UNCOUNTED_PARTS:
            total += tok.count_json(part)  # unknown part: count it all rather than nothing
    return total


def _messages_tokens(tok: Tokenizer, messages: list[Any], text_types: frozenset[str], *, roleless: bool) -> int:
    """Tokens of a conversation by chat's rule, without the reply priming.

    `roleless` admits Responses items without a role (function_call_output, ...): only their
    fields are counted.
    """
    total = 0
    for message in messages:
        if type(message) is not dict:
            total += tok.count(message) if type(message) is str else tok.count_json(message)
            continue
        role = message.get("role")
        if role is None and roleless:
            total += tok.field_tokens(message)
            continue
        total += tok.message_tokens(role, 0) if type(role) is str else TOKENS_PER_MESSAGE
        content = message.get("content")
        if type(content) is str:
            # System and developer prompts usually repeat on every row of a batch.
            total += tok.count_shared(content) if role == "system" or role == "developer" else tok.count(content)
        elif type(content) is list:
            total += _parts_tokens(tok, content, text_types)
        elif content is not None:
            total += tok.count_json(content)
        if len(message) > 2:
            total += tok.field_tokens(message)
    return total


def _texts_or_token_arrays(tok: Tokenizer, value: Any) -> tuple[int, int]:
    """(tokens, number of inputs) of a completions prompt or an embeddings input.

    Accepts a string, an array of strings, a token array, or an array of token arrays;
    anything else counts as its JSON, one input.
    """
    if type(value) is str:
        return tok.count(value), 1
    if type(value) is list and value:
        first = value[0]
        if type(first) is str:
            total = 0
            for item in value:
                total += tok.count(item) if type(item) is str else tok.count_json(item)
            return total, len(value)
        if type(first) is int:
            return len(value), 1
        if type(first) is list:
            total = 0
            for item in value:
                total += len(item) if type(item) is list else tok.count_json(item)
            return total, len(value)
    if value is None:
        return 0, 1
    return tok.count_json(value), 1


def _output(cap: int | None, choices: int, default: int, model: Any) -> tuple[int, bool]:
    """(output ceiling, capped) for `choices` answers of at most `cap` tokens each."""
    if cap is not None:
        return cap * choices, True
    if is_reasoning_model(model):
        default *= REASONING_OUTPUT_FACTOR
    return default * choices, False


# -- endpoints -------------------------------------------------------------------------------


def _chat(tok: Tokenizer, body: dict[str, Any], default_output: int) -> RowEstimate:
    messages = body.get("messages")
    tokens = REPLY_PRIMING_TOKENS
    if type(messages) is list:
        tokens += _messages_tokens(tok, messages, _CHAT_TEXT_PARTS, roleless=False)
    elif messages is not None:
        tokens += tok.count_json(messages)
    # Tool and output schemas are sent to the model with the prompt and billed as input.
    for key in ("tools", "functions", "response_format"):
        value = body.get(key)
        if value:
            tokens += tok.count_json(value)
    cap = _positive_int(body.get("max_completion_tokens")) or _positive_int(body.get("max_tokens"))
    out, capped = _output(cap, _positive_int(body.get("n")) or 1, default_output, body.get("model"))
    return RowEstimate(tokens, out, capped)


def _completions(tok: Tokenizer, body: dict[str, Any], default_output: int) -> RowEstimate:
    tokens, prompts = _texts_or_token_arrays(tok, body.get("prompt"))
    suffix = body.get("suffix")
    if type(suffix) is str:
        tokens += tok.count(suffix)
    cap = _positive_int(body.get("max_tokens")) or COMPLETIONS_DEFAULT_MAX_TOKENS
    # best_of generates (and bills) that many completions per prompt, returning n of them.
    choices = max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)
    return RowEstimate(tokens, cap * choices * max(prompts, 1), True)


def _embeddings(tok: Tokenizer, body: dict[str, Any], default_output: int) -> RowEstimate:
    tokens, _ = _texts_or_token_arrays(tok, body.get("input"))
    return RowEstimate(tokens, 0, True)


def _moderations(tok: Tokenizer, body: dict[str, Any], default_output: int) -> RowEstimate:
    value = body.get("input")
    if type(value) is list and value and type(value[0]) is dict:
        # Multi-modal moderation input: a content-part array.
        return RowEstimate(_parts_tokens(tok, value, _CHAT_TEXT_PARTS), 0, True)
    tokens, _ = _texts_or_token_arrays(tok, value)
    return RowEstimate(tokens, 0, True)


def _responses(tok: Tokenizer, body: dict[str, Any], default_output: int) -> RowEstimate:
    # Counted like chat, as the echo engine does: instructions act as a system message, a
    # string input as one user message.
    tokens = REPLY_PRIMING_TOKENS
    instructions = body.get("instructions")
    if type(instructions) is str and instructions:
        tokens += tok.message_tokens("system", tok.count_shared(instructions))
    items = body.get("input")
    if type(items) is str:
        tokens += tok.message_tokens("user", tok.count(items))
    elif type(items) is list:
        tokens += _messages_tokens(tok, items, _RESPONSES_TEXT_PARTS, roleless=True)
    elif items is not None:
        tokens += tok.count_json(items)
    tools = body.get("tools")
    if tools:
        tokens += tok.count_json(tools)
    text = body.get("text")
    if type(text) is dict and text.get("format"):
        tokens += tok.count_json(text["format"])  # structured-output schema
    out, capped = _output(_positive_int(body.get("max_output_tokens")), 1, default_output, body.get("model"))
    return RowEstimate(tokens, out, capped)


def _unknown(tok: Tokenizer, body: dict[str, Any], default_output: int) -> RowEstimate:
    # An endpoint this module does not know: bill the whole body as input, and any cap it
    # names (else the guess) as output, rather than estimate nothing.
    cap = (
        _positive_int(body.get("max_completion_tokens"))
        or _positive_int(body.get("max_output_tokens"))
        or _positive_int(body.get("max_tokens"))
    )
    out, capped = _output(cap, _positive_int(body.get("n")) or 1, default_output, body.get("model"))
    return RowEstimate(tok.count_json(body), out, capped)


_HANDLERS: dict[str, Callable[[Tokenizer, dict[str, Any], int], RowEstimate]] = {
    CHAT: _chat,
    COMPLETIONS: _completions,
    EMBEDDINGS: _embeddings,
    MODERATIONS: _moderations,
    RESPONSES: _responses,
}
# Rows sometimes omit the version prefix ("/chat/completions"); price them the same.
_HANDLERS.update({path.removeprefix("/v1"): handler for path, handler in list(_HANDLERS.items())})


def estimate_row(
    endpoint: str, body: dict[str, Any], *, default_output_tokens: int = DEFAULT_OUTPUT_TOKENS
) -> RowEstimate:
    """Input tokens and output ceiling of one request to `endpoint` (e.g. "/v1/chat/completions").

    Never raises on odd shapes: whatever cannot be read as its endpoint's fields is counted
    as JSON text, so a malformed row is over- rather than under-estimated. Rows should be
    validated first (`llmbatch._rows.check_row`). `default_output_tokens` is the per-choice
    guess for requests that set no output cap (times 4 for reasoning models).
    """
    if type(body) is not dict:
        return RowEstimate(tokenizer_for(None).count_json(body), 0, True)
    return _HANDLERS.get(endpoint, _unknown)(tokenizer_for(body.get("model")), body, default_output_tokens)


# -- totals ----------------------------------------------------------------------------------


@dataclass
class Estimate:
    """Token and cost totals over a job's rows, overall and per model.

    Feed it with `add` for each row, then call `cost` to price it; `summary_lines` renders
    it for the terminal. Costs are estimates: input is counted offline and output is each
    row's ceiling (or the guess for rows without a cap, counted in `uncapped_rows`).
    """

    rows: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    #: Rows that set no output cap: their output tokens are a guess, not a ceiling.
    uncapped_rows: int = 0
    #: model -> (rows, input tokens, output tokens), keyed by the model string of the rows.
    by_model: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: The same for the rows among them whose prompt is over `LONG_PROMPT_TOKENS` (priced apart:
    #: some models charge more per token for those).
    long_by_model: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: Filled by `cost`: USD at Batch and at Standard (direct) prices, unpriced models as 0.
    cost_batch: float = 0.0
    cost_direct: float = 0.0
    #: Filled by `cost`: model -> (batch USD, direct USD) for priced models.
    model_costs: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Filled by `cost`: models the price table could not price.
    unpriced_models: set[str] = field(default_factory=set)
    #: Filled by `cost`: the date of the prices used; None until priced.
    prices_taken: str | None = None
    #: Filled by `cost`: models whose rows with long prompts were priced at higher long-prompt rates.
    long_priced: set[str] = field(default_factory=set)
    #: Rows answered from the response cache (not counted above: they are not sent), and what
    #: their answers cost when they were paid for.
    cached_rows: int = 0
    cached_cost: float = 0.0
    #: Rows repeating an earlier row of the job, which take its answer (not counted above).
    repeated_rows: int = 0

    def add(self, model: str, row: RowEstimate) -> None:
        """Counts one row for `model`."""
        inp = row.input_tokens
        out = row.output_tokens
        self.rows += 1
        self.input_tokens += inp
        self.output_tokens += out
        if not row.capped:
            self.uncapped_rows += 1
        _tally(self.by_model, model, 1, inp, out)
        if inp > LONG_PROMPT_TOKENS:
            _tally(self.long_by_model, model, 1, inp, out)

    @classmethod
    def from_totals(cls, totals: Iterable[tuple[str, int, int, int, int, int, int, int]]) -> Estimate:
        """An estimate from per-model sums: (model, rows, input tokens, output tokens, uncapped
        rows, and rows, input and output tokens of those with prompts over `LONG_PROMPT_TOKENS`)."""
        est = cls()
        for model, rows, inp, out, uncapped, long_rows, long_in, long_out in totals:
            est.rows += rows
            est.input_tokens += inp
            est.output_tokens += out
            est.uncapped_rows += uncapped
            est.by_model[model] = (rows, inp, out)
            if long_rows:
                est.long_by_model[model] = (long_rows, long_in, long_out)
        return est

    def merge(self, other: Estimate) -> None:
        """Adds another estimate's token totals (e.g. from a chunk counted in parallel)."""
        self.rows += other.rows
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.uncapped_rows += other.uncapped_rows
        for model, (r, i, o) in other.by_model.items():
            _tally(self.by_model, model, r, i, o)
        for model, (r, i, o) in other.long_by_model.items():
            _tally(self.long_by_model, model, r, i, o)

    def cost(self, table: PriceTable) -> None:
        """Prices the totals with `table`, filling cost_batch, cost_direct and the rest.

        Assumes no prompt-cache hits, since they cannot be known in advance. Rows with prompts
        over `LONG_PROMPT_TOKENS` pay their model's long-prompt rates where it has them. Unpriced
        models count as 0 and are listed in `unpriced_models`; a budget check should refuse
        to proceed while any remain.
        """
        self.cost_batch = 0.0
        self.cost_direct = 0.0
        self.model_costs = {}
        self.unpriced_models = set()
        self.long_priced = set()
        self.prices_taken = table.taken
        for model, (_rows, inp, out) in self.by_model.items():
            price = table.lookup(model)
            if price is None:
                self.unpriced_models.add(model)
                continue
            # Sums of many rows: the short prompts' at the base rates, the long ones' at theirs.
            long_rows, long_in, long_out = self.long_by_model.get(model, (0, 0, 0))
            long = price.tier(LONG_PROMPT_TOKENS + 1)
            if long_rows and long is not price:
                self.long_priced.add(model)
            batch, direct = (
                cost_at(price.rates(batch=b), inp - long_in, out - long_out)
                + cost_at(long.rates(batch=b), long_in, long_out)
                for b in (True, False)
            )
            self.model_costs[model] = (batch, direct)
            self.cost_batch += batch
            self.cost_direct += direct

    def summary_lines(self) -> list[str]:
        """Lines for the terminal: totals, each model, batch vs direct cost, and caveats."""
        priced = self.prices_taken is not None
        lines = [
            f"Estimate: {_plural(self.rows, 'row')}, {self.input_tokens:,} input tokens, "
            f"{self.output_tokens:,} output tokens (at most, where rows cap their output)"
        ]
        for model in sorted(self.by_model):
            rows, inp, out = self.by_model[model]
            line = f"  {model or '(no model)'}: {_plural(rows, 'row')}, {inp:,} in, {out:,} out"
            if model in self.long_priced:
                long_rows = self.long_by_model[model][0]
                line += f" ({long_rows:,} with prompts over {LONG_PROMPT_TOKENS:,} tokens, at its long-prompt rates)"
            if priced:
                costs = self.model_costs.get(model)
                if costs is None:
                    line += "; UNPRICED"
                else:
                    line += f"; batch {_usd(costs[0])} vs direct {_usd(costs[1])} (saves {_usd(costs[1] - costs[0])})"
            lines.append(line)
        if priced:
            saved = self.cost_direct - self.cost_batch
            share = f" ({saved / self.cost_direct:.0%})" if self.cost_direct > 0 else ""
            lines.append(
                f"Cost: batch {_usd(self.cost_batch)} vs direct {_usd(self.cost_direct)}; "
                f"batch saves {_usd(saved)}{share}. Prices as of {self.prices_taken or 'an unknown date'}."
            )
        if self.cached_rows:
            lines.append(
                f"Cache: {_plural(self.cached_rows, 'row')} answered from the response cache, not sent "
                f"(not counted above; they cost {_usd(self.cached_cost)} when first answered)."
            )
        if self.repeated_rows:
            lines.append(
                f"Repeats: {_plural(self.repeated_rows, 'row')} repeat an earlier row of this job, which is sent once; "
                "they take its answer (not counted above)."
            )
        if self.uncapped_rows:
            lines.append(
                f"Note: {self.uncapped_rows:,} of {self.rows:,} rows set no output cap, so their output is a guess "
                "(the default, 4x for reasoning models), not a ceiling. For a hard budget set max_completion_tokens "
                "(chat) or max_output_tokens (responses) on every row."
            )
        if self.unpriced_models:
            names = ", ".join(sorted(m or "(no model)" for m in self.unpriced_models))
            lines.append(
                f"Unpriced models (counted as $0): {names}. Price them with --price-file FILE "
                '(JSON: {"<model>": {"input": USD per 1M tokens, "output": USD per 1M tokens}}) '
                "or --price-input/--price-output."
            )
        return lines


def _tally(by_model: dict[str, tuple[int, int, int]], model: str, rows: int, inp: int, out: int) -> None:
    prev = by_model.get(model)
    by_model[model] = (rows, inp, out) if prev is None else (prev[0] + rows, prev[1] + inp, prev[2] + out)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _usd(amount: float) -> str:
    # Small jobs cost fractions of a cent; show enough digits that they do not read as free.
    if amount == 0:
        return "$0.00"
    if abs(amount) < 0.01:
        return f"${amount:.4f}"
    return f"${amount:,.2f}"
