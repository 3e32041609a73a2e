"""The echo engine: answers like OpenAI without a model, for tests, demos and benchmarks.

Chat, completions and responses requests get the (last) user text back as the reply;
embeddings get deterministic unit vectors derived from the input. Token counts use the model's
real vocabulary (`llmbatch.pricing`: o200k_base or cl100k_base), so usage numbers are realistic
and equal the estimates of requests with string contents. Any `model` string is accepted and
reported back, so any OpenAI-format batch file can be dry-run against this engine.

The per-request path is deliberately plain (no pydantic, no regexes): the server must push
100,000-row batches through it in seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sys
import time
from array import array
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from ..pricing import CL100K_BASE, O200K_BASE, REPLY_PRIMING_TOKENS, Tokenizer, get_tokenizer, tokenizer_for
from ._base import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, Engine, EngineRequest, EngineResponse, Usage, error_body
from ._request import (
    MODEL_CREATED,
    check_json_schema,
    embedding_base64,
    hex_id,
    json_parts,
    opt_positive_int,
    short_gil_turns,
    stop_strings,
)
from ._request import BadRequest as _BadRequest  # by its local name: the token-counting code raises it too
from ._responses import response_object

if TYPE_CHECKING:
    from ._options import EchoOptions

__all__ = ["EchoEngine", "ECHO_MODEL_ID", "DEFAULT_EMBEDDING_DIMENSIONS", "MAX_ANSWER_CHARS", "MAX_EMBEDDING_FLOATS"]

ECHO_MODEL_ID = "echo"
#: Embedding length when the request gives no `dimensions`.
DEFAULT_EMBEDDING_DIMENSIONS = 256

# Limits mirroring OpenAI's, so a dry run flags requests OpenAI would reject, and so a
# malformed row cannot make the engine build an enormous answer.
_MAX_N = 128
_MAX_EMBEDDING_INPUTS = 2048
_MAX_INPUT_TOKENS = 8192  # per embedding input
_MAX_EMBEDDING_TOKENS = 300_000  # summed over a request's inputs
# Not OpenAI's (its models have 3,072 dimensions at most), a bound on one vector's work.
_MAX_EMBEDDING_DIMENSIONS = 8192
#: Most floats in one embeddings answer: OpenAI's largest, 2,048 inputs of text-embedding-3-large's
#: 3,072 dimensions (about 130 MB of JSON).
MAX_EMBEDDING_FLOATS = 2048 * 3072
#: Most characters of synthesised text in one answer, all choices together: a reply is the user's
#: text (or a schema's instance built from it), so `n` copies of a long text, or a schema whose
#: counts multiply, could otherwise ask for gigabytes.
MAX_ANSWER_CHARS = 4_000_000
# Requests whose body or answer may pass this many bytes are worked on in a thread, so the event
# loop (the server's health checks and polls) is not held while a big answer is built and
# serialised; smaller ones are answered inline, as a thread hop costs more than they do.
_INLINE_BYTES = 256 * 1024
# Embedding answers with more floats are serialised vector by vector (see _embeddings).
_PIECE_FLOATS = 65_536
# Heavy requests worked on at once. Their work holds the GIL nearly throughout, so two threads
# would not finish sooner; they would make the event loop wait longer for the GIL (p99 poll
# 73 ms with two, 32-39 ms with one, bench/bench_server.py) and hold twice the memory.
_HEAVY_AT_ONCE = 1
# Keys of rows failed by --echo-fail-rate; bounded so a long-running server cannot grow forever.
_MAX_FAILURE_KEYS = 1_000_000

_CHAT_TEXT_PARTS = frozenset({"text"})
_RESPONSES_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})

_INJECTED_FAILURE_BODY = error_body(
    "echo engine: injected failure (--echo-fail-rate)", "server_error", code="injected_failure"
)
_CHAT_USAGE_PROMPT_DETAILS = {"cached_tokens": 0, "audio_tokens": 0}
_CHAT_USAGE_COMPLETION_DETAILS = {
    "reasoning_tokens": 0,
    "audio_tokens": 0,
    "accepted_prediction_tokens": 0,
    "rejected_prediction_tokens": 0,
}
_EMBEDDING_DOMAIN = b"llmbatch-echo-embedding\x00"
_LITTLE_ENDIAN = sys.byteorder == "little"


def _check_common(body: Any) -> str:
    """Checks what every endpoint requires and returns the model name."""
    if not isinstance(body, dict):
        raise _BadRequest("The request body must be a JSON object.", None)
    model = body.get("model")
    if type(model) is not str or not model:
        raise _BadRequest("Missing or invalid 'model': expected a non-empty string.", "model")
    if body.get("stream"):
        raise _BadRequest("Streaming is not supported by the echo engine or in batches.", "stream")
    return model


def _content_text(content: Any, text_types: frozenset[str]) -> str:
    """The text of a message's content: a string, or the joined text of its text parts.

    Raises _BadRequest with `param` relative to the content ("content", "content[1].text").
    """
    if type(content) is str:
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise _BadRequest("Invalid content: expected a string or an array of content parts.", "content")
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _BadRequest("Invalid content part: expected an object.", f"content[{j}]")
        if part.get("type") in text_types:
            text = part.get("text")
            if type(text) is not str:
                raise _BadRequest("Invalid text part: 'text' must be a string.", f"content[{j}].text")
            texts.append(text)
        # Other parts (images, audio, files) carry no text to echo.
    return "".join(texts)


def _count_messages(
    tok: Tokenizer,
    messages: list[Any],
    text_types: frozenset[str],
    param: str,
    *,
    what: str = "message",
    roleless: bool = False,
) -> tuple[int, str, int]:
    """Counts a conversation's prompt tokens by chat's rule; also finds the last user text.

    `roleless` admits items without a role (Responses' function_call_output, reasoning, ...):
    their fields are counted, nothing of theirs is echoed. `what` names an item in errors.
    Returns (prompt tokens without the reply priming, last user text, its token count).
    """
    total = 0
    last_text = ""
    last_tokens = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRequest(f"Invalid {what}: expected an object.", f"{param}[{i}]")
        role = message.get("role")
        if role is None and roleless:
            total += tok.field_tokens(message)
            continue
        if type(role) is not str:
            raise _BadRequest(f"Invalid {what}: 'role' must be a string.", f"{param}[{i}].role")
        try:
            text = _content_text(message.get("content"), text_types)
        except _BadRequest as e:
            e.param = f"{param}[{i}].{e.param}"
            raise
        n = tok.count(text)
        total += tok.message_tokens(role, n)
        if role == "user":
            last_text, last_tokens = text, n
        if len(message) > 2:
            total += tok.field_tokens(message)
    return total, last_text, last_tokens


def _generate(
    tok: Tokenizer, text: str, n_tokens: int, max_tokens: int | None, stops: tuple[str, ...]
) -> tuple[str, int, bool]:
    """Applies stop strings, then the token limit, to an echoed reply.

    Returns (text, its token count, whether the token limit cut it). Stop strings go first
    because a model stops at whichever comes first, and cutting at a stop can only shorten.
    """
    if stops:
        cut = -1
        for s in stops:
            i = text.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            text = text[:cut]
            n_tokens = tok.count(text)
    if max_tokens is not None and n_tokens > max_tokens:
        return tok.decode(tok.encode(text)[:max_tokens]), max_tokens, True
    return text, n_tokens, False


def _is_token_array(value: list[Any]) -> bool:
    return all(type(t) is int for t in value)


def _decode_tokens(tok: Tokenizer, tokens: list[int], param: str) -> str:
    try:
        return tok.decode(tokens)
    except KeyError:
        raise _BadRequest(f"Invalid token array: contains ids outside the {tok.name} vocabulary.", param) from None


def _embedding(text: str, dimensions: int) -> array:
    """A deterministic unit vector (float32) for `text`.

    SHAKE-256 is an extendable hash, so a shorter vector is the re-normalised prefix of a
    longer one, like OpenAI's `dimensions` shortening.
    """
    raw = hashlib.shake_256(_EMBEDDING_DOMAIN + text.encode("utf-8", "surrogatepass")).digest(2 * dimensions)
    ints = array("h")
    ints.frombytes(raw)
    if not _LITTLE_ENDIAN:
        ints.byteswap()  # same vectors on every platform
    norm = math.hypot(*ints)
    if norm == 0.0:  # all-zero hash output: astronomically unlikely, but a vector must have length 1
        ints[0] = 1
        norm = 1.0
    inv = 1.0 / norm
    return array("f", [x * inv for x in ints])


class EchoEngine(Engine):
    """Answers chat, completions, embeddings and responses requests without a model.

    With `echo_latency` it sleeps that long per request; with `echo_fail_rate` it fails a
    deterministic share of rows with a retryable 500 (see `_should_fail`).
    """

    name = "echo"
    # No moderations: a batch for an endpoint an engine lacks must fail validation, and this
    # engine is how that path gets exercised.
    endpoints = frozenset({CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES})

    def __init__(self, config: EchoOptions) -> None:
        self.config = config
        self.max_concurrency = config.max_concurrency
        self._latency = float(config.echo_latency)
        self._fail_rate = float(config.echo_fail_rate)
        #: How many times each row key has been failed already; only failed keys are stored.
        self._failures: dict[str, int] = {}
        self._handlers: dict[str, Callable[[dict[str, Any]], EngineResponse]] = {
            CHAT: self._chat,
            COMPLETIONS: self._completions,
            EMBEDDINGS: self._embeddings,
            RESPONSES: self._responses,
        }
        self._heavy_slots = asyncio.Semaphore(_HEAVY_AT_ONCE)

    async def start(self) -> None:
        # Load the vocabularies now rather than inside the first requests' latency.
        for name in (CL100K_BASE, O200K_BASE):
            await asyncio.to_thread(get_tokenizer(name).load)

    def validate_model(self, model: str) -> str | None:
        return None if model else "model must be a non-empty string"

    async def list_models(self) -> list[dict[str, Any]]:
        return [{"id": ECHO_MODEL_ID, "object": "model", "created": MODEL_CREATED, "owned_by": "llmbatch"}]

    async def handle(self, request: EngineRequest) -> EngineResponse:
        if self._latency > 0:
            await asyncio.sleep(self._latency)
        if self._fail_rate > 0 and self._should_fail(request):
            return EngineResponse(500, _copy_error(_INJECTED_FAILURE_BODY))
        handler = self._handlers.get(request.endpoint)
        if handler is None:
            return EngineResponse(404, error_body(f"Invalid URL (POST {request.endpoint})", "invalid_request_error"))
        if not _heavy(request):
            return _answer(handler, request.body)
        async with self._heavy_slots:
            with short_gil_turns():
                return await asyncio.to_thread(_answer, handler, request.body, serialise=True)

    # -- injected failures -------------------------------------------------------------------

    def _should_fail(self, request: EngineRequest) -> bool:
        """Decides whether to fail this submission of a row, deterministically.

        The row's key is its custom_id (else a hash of its body); the n-th failure of a key
        is drawn from hash(key, n). The same sequence of submissions therefore fails the same
        rows every time, while a retry of a failed row draws anew and can succeed.
        """
        key = request.custom_id
        if key is None:
            try:
                raw = orjson.dumps(request.body, option=orjson.OPT_SORT_KEYS)
            except TypeError:
                raw = repr(request.body).encode()
            key = hashlib.blake2b(raw, digest_size=16).hexdigest()
        failures = self._failures
        n = failures.get(key, 0)
        digest = hashlib.blake2b(f"{key}\x00{n}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        # The top 53 bits map exactly onto [0, 1), so rate 1.0 always fails and 0.0 never does.
        draw = (int.from_bytes(digest, "big") >> 11) * (1.0 / (1 << 53))
        if draw >= self._fail_rate:
            return False
        if n == 0 and len(failures) >= _MAX_FAILURE_KEYS:
            del failures[next(iter(failures))]  # dicts keep insertion order: drop the oldest
        failures[key] = n + 1
        return True

    # -- endpoints ---------------------------------------------------------------------------

    def _chat(self, body: dict[str, Any]) -> EngineResponse:
        model = _check_common(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("Missing or invalid 'messages': expected a non-empty array.", "messages")
        n = opt_positive_int(body, "n", _MAX_N) or 1
        max_completion = opt_positive_int(body, "max_completion_tokens")
        max_tokens = opt_positive_int(body, "max_tokens")
        if max_completion is not None:
            max_tokens = max_completion
        stops = stop_strings(body)

        tok = tokenizer_for(model)
        prompt_tokens, reply, reply_tokens = _count_messages(tok, messages, _CHAT_TEXT_PARTS, "messages")
        prompt_tokens += REPLY_PRIMING_TOKENS
        schema = _json_schema_of(body.get("response_format"))
        if schema is not None:  # structured output: an instance of the schema, built from the user's text
            reply = orjson.dumps(_instance(schema, schema, reply, [MAX_ANSWER_CHARS])).decode()
            reply_tokens = tok.count(reply)
            max_tokens = None if max_tokens is None else max(max_tokens, reply_tokens)
        reply, reply_tokens, cut = _generate(tok, reply, reply_tokens, max_tokens, stops)
        _check_answer_size(n * len(reply), "n", f"{n} choices of {len(reply):,}")
        finish_reason = "length" if cut else "stop"
        completion_tokens = reply_tokens * n
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": reply, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            for i in range(n)
        ]
        out = {
            "id": hex_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": dict(_CHAT_USAGE_PROMPT_DETAILS),
                "completion_tokens_details": dict(_CHAT_USAGE_COMPLETION_DETAILS),
            },
            "service_tier": "default",
            "system_fingerprint": "fp_llmbatch_echo",
        }
        return EngineResponse(200, out, Usage(prompt_tokens, completion_tokens, 0, 0))

    def _completions(self, body: dict[str, Any]) -> EngineResponse:
        model = _check_common(body)
        n = opt_positive_int(body, "n", _MAX_N) or 1
        # Unlike OpenAI (default 16), only an explicit max_tokens truncates: an echo of the
        # whole prompt is more useful than an arbitrary cut.
        max_tokens = opt_positive_int(body, "max_tokens")
        stops = stop_strings(body)
        tok = tokenizer_for(model)
        prompts = _completion_prompts(tok, body.get("prompt"))

        prompt_tokens = 0
        completion_tokens = 0
        answer_chars = 0
        choices: list[dict[str, Any]] = []
        for text, n_tokens in prompts:
            prompt_tokens += n_tokens
            reply, reply_tokens, cut = _generate(tok, text, n_tokens, max_tokens, stops)
            answer_chars += n * len(reply)
            _check_answer_size(answer_chars, "n", f"{n} choices of each of {len(prompts)} prompts")
            finish_reason = "length" if cut else "stop"
            for _ in range(n):
                choices.append({"text": reply, "index": len(choices), "logprobs": None, "finish_reason": finish_reason})
                completion_tokens += reply_tokens
        out = {
            "id": hex_id("cmpl-"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_llmbatch_echo",
        }
        return EngineResponse(200, out, Usage(prompt_tokens, completion_tokens, 0, 0))

    def _embeddings(self, body: dict[str, Any]) -> EngineResponse:
        model = _check_common(body)
        dimensions = opt_positive_int(body, "dimensions", _MAX_EMBEDDING_DIMENSIONS) or DEFAULT_EMBEDDING_DIMENSIONS
        encoding_format = body.get("encoding_format")
        if encoding_format is None:
            encoding_format = "float"
        elif encoding_format != "float" and encoding_format != "base64":
            raise _BadRequest(
                f"Invalid 'encoding_format': expected 'float' or 'base64', got {encoding_format!r}.",
                "encoding_format",
            )
        raw_input = body.get("input")
        count = len(raw_input) if isinstance(raw_input, list) and not _is_token_array(raw_input) else 1
        if count * dimensions > MAX_EMBEDDING_FLOATS:
            raise _BadRequest(
                f"Invalid 'dimensions': {count:,} inputs of {dimensions:,} dimensions are more than the "
                f"{MAX_EMBEDDING_FLOATS:,} floats this server answers in one request; send fewer inputs or dimensions.",
                "dimensions",
            )
        inputs = _embedding_inputs(tokenizer_for(model), raw_input)
        prompt_tokens = 0
        for i, (_, n_tokens) in enumerate(inputs):
            if n_tokens > _MAX_INPUT_TOKENS:
                where = "input" if len(inputs) == 1 else f"input[{i}]"
                raise _BadRequest(
                    f"Invalid '{where}': {n_tokens:,} tokens; an input is at most {_MAX_INPUT_TOKENS:,}.", "input"
                )
            prompt_tokens += n_tokens
        if prompt_tokens > _MAX_EMBEDDING_TOKENS:
            raise _BadRequest(
                f"Invalid 'input': {prompt_tokens:,} tokens in all; a request is at most {_MAX_EMBEDDING_TOKENS:,}.",
                "input",
            )

        as_base64 = encoding_format == "base64"
        # A big answer is serialised vector by vector as it is built: its floats are freed as it
        # goes instead of piling up millions of Python objects for the garbage collector to walk
        # (which holds the GIL, and with it the event loop, for tens of milliseconds).
        in_pieces = len(inputs) * dimensions > _PIECE_FLOATS
        data: list[Any] = []
        for i, (text, _) in enumerate(inputs):
            vector = _embedding(text, dimensions)
            item = {
                "object": "embedding",
                "index": i,
                "embedding": embedding_base64(vector) if as_base64 else vector.tolist(),
            }
            data.append(orjson.Fragment(orjson.dumps(item)) if in_pieces else item)
        out = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return EngineResponse(200, out, Usage(prompt_tokens, 0, 0, 0))

    def _responses(self, body: dict[str, Any]) -> EngineResponse:
        model = _check_common(body)
        max_output_tokens = opt_positive_int(body, "max_output_tokens")
        instructions = body.get("instructions")
        if instructions is not None and type(instructions) is not str:
            raise _BadRequest("Invalid 'instructions': expected a string.", "instructions")
        items = body.get("input")
        # Counted like chat: instructions act as a system message, a string input as one
        # user message.
        tok = tokenizer_for(model)
        input_tokens = REPLY_PRIMING_TOKENS
        if instructions:
            input_tokens += tok.message_tokens("system", tok.count(instructions))
        if type(items) is str:
            reply = items
            reply_tokens = tok.count(reply)
            input_tokens += tok.message_tokens("user", reply_tokens)
        elif isinstance(items, list) and items:
            counted, reply, reply_tokens = _count_response_items(tok, items)
            input_tokens += counted
        else:
            raise _BadRequest("Missing or invalid 'input': expected a string or a non-empty array.", "input")

        text, output_tokens, cut = _generate(tok, reply, reply_tokens, max_output_tokens, ())
        _check_answer_size(len(text), "max_output_tokens", "the echoed input")
        # The same response object the model engines answer with (they echo the request's
        # parameters back the same way).
        out = response_object(body, text=text, cut=cut, input_tokens=input_tokens, output_tokens=output_tokens)
        return EngineResponse(200, out, Usage(input_tokens, output_tokens, 0, 0))


def _answer(
    handler: Callable[[dict[str, Any]], EngineResponse], body: dict[str, Any], *, serialise: bool = False
) -> EngineResponse:
    """`handler`'s answer to `body`, its JSON already serialised when `serialise` (in a thread,
    so the event loop does not do it)."""
    try:
        resp = handler(body)
    except _BadRequest as e:
        return EngineResponse(400, error_body(e.message, "invalid_request_error", param=e.param))
    except Exception as e:  # an engine must answer, never raise
        return EngineResponse(500, error_body(f"echo engine: internal error: {e!r}", "server_error"))
    if serialise and isinstance(resp.body, dict):
        resp.body = json_parts(resp.body)
    return resp


def _heavy(request: EngineRequest) -> bool:
    """Whether `request`'s body or answer may be big enough to work on in a thread (a cheap
    guess from its size and a few fields; structured outputs always, their schemas multiply)."""
    if request.size > _INLINE_BYTES:
        return True
    body = request.body
    if not isinstance(body, dict):
        return False
    if request.endpoint == EMBEDDINGS:
        inputs, dims = body.get("input"), body.get("dimensions")
        count = len(inputs) if isinstance(inputs, list) else 1
        return count * (dims if type(dims) is int else DEFAULT_EMBEDDING_DIMENSIONS) * 20 > _INLINE_BYTES
    n = body.get("n")
    if type(n) is int and n > 1 and max(request.size, 1) * n > _INLINE_BYTES:
        return True
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") == "json_schema"


def _check_answer_size(chars: int, param: str, what: str) -> None:
    if chars > MAX_ANSWER_CHARS:
        raise _BadRequest(
            f"Invalid '{param}': the answer would hold {chars:,} characters ({what}); this server synthesises "
            f"at most {MAX_ANSWER_CHARS:,} per answer. Lower '{param}' or send less text.",
            param,
        )


def _copy_error(body: dict[str, Any]) -> dict[str, Any]:
    # Callers may mutate answer bodies; never hand out the shared template.
    return {"error": dict(body["error"])}


def _completion_prompts(tok: Tokenizer, prompt: Any) -> list[tuple[str, int]]:
    """(text, token count) for each prompt of a completions request."""
    if type(prompt) is str:
        return [(prompt, tok.count(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(type(p) is str for p in prompt):
            return [(p, tok.count(p)) for p in prompt]
        if _is_token_array(prompt):
            return [(_decode_tokens(tok, prompt, "prompt"), len(prompt))]
        if all(isinstance(p, list) and p and _is_token_array(p) for p in prompt):
            return [(_decode_tokens(tok, p, f"prompt[{i}]"), len(p)) for i, p in enumerate(prompt)]
    raise _BadRequest(
        "Missing or invalid 'prompt': expected a string, an array of strings, or one or more non-empty token arrays.",
        "prompt",
    )


def _embedding_inputs(tok: Tokenizer, value: Any) -> list[tuple[str, int]]:
    """(text, token count) for each input of an embeddings request.

    Token arrays are decoded, so they embed exactly like the text they spell.
    """
    if type(value) is str:
        if not value:
            raise _BadRequest("Invalid 'input': empty strings cannot be embedded.", "input")
        return [(value, tok.count(value))]
    if isinstance(value, list) and value:
        if len(value) > _MAX_EMBEDDING_INPUTS:
            raise _BadRequest(f"Invalid 'input': at most {_MAX_EMBEDDING_INPUTS} inputs per request.", "input")
        if all(type(v) is str for v in value):
            for i, v in enumerate(value):
                if not v:
                    raise _BadRequest("Invalid 'input': empty strings cannot be embedded.", f"input[{i}]")
            return [(v, tok.count(v)) for v in value]
        if _is_token_array(value):
            return [(_decode_tokens(tok, value, "input"), len(value))]
        if all(isinstance(v, list) and v and _is_token_array(v) for v in value):
            return [(_decode_tokens(tok, v, f"input[{i}]"), len(v)) for i, v in enumerate(value)]
    raise _BadRequest(
        "Missing or invalid 'input': expected a non-empty string, an array of strings, "
        "or one or more non-empty token arrays.",
        "input",
    )


def _count_response_items(tok: Tokenizer, items: list[Any]) -> tuple[int, str, int]:
    """Counts a Responses input list like a chat conversation; finds the last user text."""
    return _count_messages(tok, items, _RESPONSES_TEXT_PARTS, "input", what="input item", roleless=True)


def _json_schema_of(response_format: Any) -> dict[str, Any] | None:
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        return None
    check_json_schema(schema)  # _instance builds minItems copies: bound them first
    return schema


def _spend(budget: list[int], chars: int) -> None:
    budget[0] -= chars
    if budget[0] < 0:
        raise _BadRequest(
            f"Invalid schema: its answer would hold more than the {MAX_ANSWER_CHARS:,} characters this server "
            "synthesises per answer (its counts multiply); lower minItems or send less text.",
            "response_format.json_schema.schema",
        )


def _leaf(value: Any, budget: list[int]) -> Any:
    """`value` (a schema's const, enum option or minimum), paid for by its JSON length."""
    try:
        size = len(orjson.dumps(value))
    except TypeError:  # not JSON (a schema is JSON, so only from Python callers)
        size = 1
    _spend(budget, size)
    return value


def _instance(node: Any, root: dict[str, Any], text: str, budget: list[int], depth: int = 0) -> Any:
    """A JSON value that satisfies `node` (a JSON schema): the first enum value or option, the
    user's text for strings, 0 / false / [] otherwise; so local runs of structured-output tasks
    parse and validate. Echo's answer is a fixture, not a guess at the right label.

    `budget` holds the characters the answer may still take (about: strings count their length,
    other values one); an answer past it is a 400, found before the copies are built."""
    if not isinstance(node, dict) or depth > 20:
        _spend(budget, 1)
        return None
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _instance(target, root, text, budget, depth + 1)
    if "const" in node:
        return _leaf(node["const"], budget)
    if isinstance(node.get("enum"), list) and node["enum"]:
        return _leaf(node["enum"][0], budget)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(node.get(key), list) and node[key]:
            return _instance(node[key][0], root, text, budget, depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in node:
        props = node.get("properties") or {}
        out = {}
        for k, v in props.items():
            _spend(budget, len(k) + 4)
            out[k] = _instance(v, root, text, budget, depth + 1)
        return out
    if kind == "array":
        count = int(node.get("minItems") or 0)
        if not isinstance(node.get("items"), dict) or count == 0:
            _spend(budget, 2)
            return []
        # One item is built (and paid for); the copies are the same object, paid for before made.
        before = budget[0]
        item = _instance(node["items"], root, text, budget, depth + 1)
        _spend(budget, (before - budget[0] + 1) * (count - 1) + 2)
        return [item] * count
    if kind == "string":
        _spend(budget, len(text) + 2)
        return text
    if kind in ("integer", "number"):
        return _leaf(node.get("minimum", 0), budget)
    _spend(budget, 5)
    return False if kind == "boolean" else None
