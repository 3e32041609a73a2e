"""What every in-process model engine shares (llamacpp, transformers, vllm).

A model engine owns one model (plus LoRA adapters and an optional sentence-embedding
model) and answers chat and completions requests by generating text. This module does the
parts that do not depend on the inference library:

- parsing a request body into a `Generation` (prompt, sampling parameters, adapter), with a
  400 answer naming the parameter for anything the engine cannot honour, so nothing is
  silently dropped;
- model names: a row's `body.model` must be one of the served names of the base model or
  the name of a registered adapter (`--adapter NAME=PATH`); anything else fails that row's
  validation, like a hosted open-model batch service would;
- a single worker thread that owns the model: `handle` queues a `Generation` and awaits its
  result, the thread takes as many queued generations as the engine can run together;
- OpenAI-format chat.completion / text_completion bodies with real usage counts;
- `/v1/embeddings` through a `SentenceEmbedder` when one is configured.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._base import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Engine,
    EngineRequest,
    EngineResponse,
    TextDelta,
    Usage,
    error_body,
)
from ._embed import SentenceEmbedder, resolve_embedding_model
from ._facts import EngineFacts, ModelCatalog
from ._options import parse_adapters
from ._request import (
    BadRequest,
    check_json_schema,
    hex_id,
    opt_positive_int,
    resolve_future,
    stop_strings,
)
from ._responses import chat_request, response_object, responses_error

if TYPE_CHECKING:
    from ._options import ModelOptions

__all__ = [
    "Choice",
    "Generation",
    "ModelEngine",
    "model_names",
]

log = logging.getLogger("llmbatch.engines")

_MAX_N = 16
# Parameters an engine may not support; each engine lists the ones it does in `supported`.
_OPTIONAL = ("tools", "tool_choice", "logprobs", "top_logprobs", "logit_bias", "response_format", "functions")


@dataclass(slots=True)
class Choice:
    """One generated continuation."""

    text: str
    finish_reason: str  # "stop" or "length"
    tokens: int


@dataclass(slots=True)
class Generation:
    """One chat or completions request, parsed; `choices` and `prompt_tokens` are filled by the engine."""

    endpoint: str
    model: str
    #: The LoRA adapter's name, or None for the base model.
    adapter: str | None
    #: Chat: the messages (text only). Completions: None.
    messages: list[dict[str, str]] | None
    #: Completions: the prompt text. Chat: None (the engine applies its chat template).
    prompt: str | None
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    n: int
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: A JSON schema the answer must follow (response_format json_schema), or {} for any JSON object.
    json_schema: dict[str, Any] | None = None
    prompt_tokens: int = 0
    choices: list[Choice] = field(default_factory=list)
    #: Set by the engine when the request cannot be run: a 400 for the row's own fault (a prompt
    #: longer than the context), `error_status` 5xx when the engine failed.
    error: str | None = None
    error_status: int = 400
    #: Set while the answer is streamed: the worker thread calls it with (choice index, new text)
    #: as text is generated. Engines that generate token by token call it; others never do, and
    #: their answer is streamed whole once done.
    on_text: Callable[[int, str], None] | None = None


def model_names(path: str | Path, served: str | None) -> tuple[str, ...]:
    """The names a row may use for the base model: the served name, else the file or directory name."""
    p = Path(path)
    stem = p.name
    for suffix in (".gguf", ".GGUF"):
        stem = stem.removesuffix(suffix)
    names = [served] if served else []
    names += [stem, str(path)]
    return tuple(dict.fromkeys(n for n in names if n))


def _float(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float) or not lo <= value <= hi:
        raise BadRequest(f"Invalid '{name}': expected a number from {lo} to {hi}, got {value!r}.", name)
    return float(value)


def _text_of(content: Any, param: str) -> str:
    if content is None:
        return ""
    if type(content) is str:
        return content
    if not isinstance(content, list):
        raise BadRequest("Invalid content: expected a string or an array of content parts.", param)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or type(part.get("text")) is not str:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRequest(
                f"Unsupported content part {kind!r}: this engine's model reads text parts only.", f"{param}[{j}]"
            )
        texts.append(part["text"])
    return "".join(texts)


class ModelEngine(Engine):
    """Base of the in-process model engines. Subclasses load a model and run generations.

    Subclasses implement `_load` (in a thread, at start) and `_run(take)` (the worker thread's
    loop): `take(limit, block)` returns up to `limit` queued generations (an empty list when
    the engine is stopping), and each finished one is passed to `self._done(item)`.
    """

    endpoints = frozenset({CHAT, COMPLETIONS, RESPONSES})
    #: Optional parameters this engine honours (see `_OPTIONAL`); others get a 400 naming them.
    supported: frozenset[str] = frozenset()
    #: Whether the engine can answer more than one choice (`n`) per request.
    max_n: int = _MAX_N

    def __init__(self, config: ModelOptions) -> None:
        self.config = config
        self.adapters = parse_adapters(config.adapters)
        self.embedder: SentenceEmbedder | None = None
        embedding_path = resolve_embedding_model(config.embedding_model)
        if embedding_path is not None:
            self.embedder = SentenceEmbedder(embedding_path, batch_size=config.embedding_batch_size)
            self.endpoints = self.endpoints | {EMBEDDINGS}
        self.base_names: tuple[str, ...] = (
            model_names(config.model_path, config.served_model_name) if config.model_path else ()
        )
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._main, name=f"llmbatch-{self.name}", daemon=True)
        self._thread.start()
        log.info("engine %s ready: model %s", self.name, ", ".join(self.base_names[:1]))

    async def aclose(self) -> None:
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self.embedder is not None:
            await self.embedder.aclose()
        await asyncio.to_thread(self._unload)

    @abstractmethod
    def _load(self) -> None:
        """Loads the model and adapters; sets `self.base_names`. Runs in a thread."""

    def _unload(self) -> None:
        """Frees what `_load` took."""

    @abstractmethod
    def _run(self, take: _Take) -> None:
        """The worker thread's loop: runs generations until `take` returns an empty list."""

    def _main(self) -> None:
        try:
            self._run(self._take)
        except BaseException as exc:  # the thread must not die silently with requests waiting
            log.exception("engine %s: worker thread failed", self.name)
            self._stopping = True
            self._fail_all(f"{self.name} engine failed: {exc!r}")

    def _take(self, limit: int, block: bool) -> list[_Item]:
        """Up to `limit` queued items; waits for the first one when `block`. [] means stop."""
        items: list[_Item] = []
        while len(items) < limit:
            try:
                item = self._queue.get(block=block and not items, timeout=None)
            except queue.Empty:
                break
            if item is None:
                self._stopping = True
                self._queue.put(None)  # keep the sentinel for any later call
                return items
            if item.cancelled:
                continue
            items.append(item)
        return items

    def _fail_all(self, message: str) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.generation.error = message
                item.generation.error_status = 500
                self._done(item)

    def _fail(self, item: _Item, message: str, status: int = 400) -> None:
        """Answers `item` with an error: 400 for the row's own fault, 5xx when the engine failed."""
        item.generation.error = message
        item.generation.error_status = status
        self._done(item)

    def _done(self, item: _Item) -> None:
        """Called by the worker thread when `item` is finished (or failed with `generation.error`)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(resolve_future, item.future)

    # -- models ---------------------------------------------------------------------------

    def catalog(self) -> ModelCatalog:
        """The names this engine answers to; its model checks below are the catalog's."""
        embedding = self.embedder.names if self.embedder is not None else ()
        return ModelCatalog(tuple(self.base_names), tuple(self.adapters), tuple(embedding))

    def facts(self) -> EngineFacts:
        return EngineFacts(self.name, self.endpoints, self.max_concurrency, self.catalog())

    def validate_model(self, model: str) -> str | None:
        return self.catalog().validate(model)

    def model_family(self, model: str) -> str:
        return self.catalog().family(model)

    def served_models(self) -> tuple[str, ...] | None:
        return self.catalog().served()

    async def list_models(self) -> list[dict[str, Any]]:
        return self.catalog().listing()

    # -- requests -------------------------------------------------------------------------

    async def handle(self, request: EngineRequest) -> EngineResponse:
        try:
            if request.endpoint == EMBEDDINGS and self.embedder is not None:
                return await self.embedder.handle(request.body)
            if request.endpoint == RESPONSES:
                return await self._respond(request.body)
            if request.endpoint not in (CHAT, COMPLETIONS):
                return EngineResponse(
                    404, error_body(f"Invalid URL (POST {request.endpoint})", "invalid_request_error")
                )
            gen = self.parse(request.endpoint, request.body)
        except BadRequest as e:
            return EngineResponse(400, error_body(e.message, "invalid_request_error", param=e.param))
        return await self.generate(gen)

    async def _respond(self, body: Any) -> EngineResponse:
        """A Responses API request, run as the chat request it translates to (see `_responses`)."""
        gen = self._responses_generation(body)
        return self._responses_answer(body, gen, await self.generate(gen))

    def _responses_generation(self, body: Any) -> Generation:
        chat = chat_request(body, self.name)
        try:
            return self.parse(CHAT, chat)
        except BadRequest as e:  # name the Responses parameter the caller sent, not its chat twin
            raise responses_error(e) from None

    def _responses_answer(self, body: dict[str, Any], gen: Generation, answer: EngineResponse) -> EngineResponse:
        if not answer.ok:
            return answer
        choice = gen.choices[0]
        out = response_object(
            body,
            text=choice.text,
            cut=choice.finish_reason == "length",
            input_tokens=gen.prompt_tokens,
            output_tokens=choice.tokens,
        )
        return EngineResponse(200, out, answer.usage)

    async def stream(self, request: EngineRequest) -> AsyncIterator[TextDelta | EngineResponse]:
        """Text as the worker thread generates it (where the engine reports it), then the answer."""
        if request.endpoint not in (CHAT, COMPLETIONS, RESPONSES):
            yield await self.handle(request)
            return
        try:
            if request.endpoint == RESPONSES:
                gen = self._responses_generation(request.body)
            else:
                gen = self.parse(request.endpoint, request.body)
        except BadRequest as e:
            yield EngineResponse(400, error_body(e.message, "invalid_request_error", param=e.param))
            return
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[TextDelta | EngineResponse] = asyncio.Queue()

        def on_text(index: int, text: str) -> None:  # on the worker thread
            loop.call_soon_threadsafe(pieces.put_nowait, TextDelta(index, text))

        async def run() -> None:
            # The worker resolves the request's future after its last on_text, both through
            # call_soon_threadsafe, so every piece is queued before the answer.
            try:
                answer = await self.generate(gen)
            except Exception as exc:  # an engine answers, never raises; if it did, the stream ends in an error
                log.exception("engine %s failed on a streamed request", self.name)
                answer = EngineResponse(500, error_body(f"{self.name} engine failed: {exc!r}", "server_error"))
            if request.endpoint == RESPONSES:
                answer = self._responses_answer(request.body, gen, answer)
            pieces.put_nowait(answer)

        gen.on_text = on_text
        task = asyncio.create_task(run())
        try:
            while True:
                piece = await pieces.get()
                yield piece
                if isinstance(piece, EngineResponse):
                    return
        finally:
            task.cancel()  # the caller hung up: the engine drops the request (its slot is freed)

    async def generate(self, gen: Generation) -> EngineResponse:
        """Runs a parsed request on the worker thread; its chat or completions answer."""
        if self._stopping or self._thread is None:
            return EngineResponse(503, error_body(f"the {self.name} engine is not running", "server_error"))
        item = _Item(gen, asyncio.get_running_loop().create_future())
        self._queue.put(item)
        if not self._thread.is_alive():  # the worker died meanwhile: nobody else will answer it
            self._fail_all(f"the {self.name} engine stopped")
        try:
            await item.future
        except asyncio.CancelledError:
            item.cancelled = True
            raise
        if gen.error is not None:
            kind = "invalid_request_error" if gen.error_status < 500 else "server_error"
            return EngineResponse(gen.error_status, error_body(gen.error, kind))
        return self.response(gen)

    def parse(self, endpoint: str, body: Any) -> Generation:
        """A request body as a `Generation`; raises BadRequest naming what is wrong or unsupported."""
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.", None)
        model = body.get("model")
        if type(model) is not str or not model:
            raise BadRequest("Missing or invalid 'model': expected a non-empty string.", "model")
        why = self.validate_model(model)
        if why is not None:
            raise BadRequest(why, "model")
        if self.embedder is not None and model in self.embedder.names:
            raise BadRequest(f"{model!r} is an embedding model: send it to /v1/embeddings", "model")
        if body.get("stream"):
            raise BadRequest("Streaming is not supported in batches.", "stream")
        for name in _OPTIONAL:
            if body.get(name) is not None and name not in self.supported:
                if name == "response_format" and (body[name] or {}).get("type") == "text":
                    continue
                if name in ("logprobs", "tool_choice") and body[name] in (False, "none"):
                    continue
                raise BadRequest(f"'{name}' is not supported by the {self.name} engine.", name)
        max_tokens = opt_positive_int(body, "max_tokens")
        if endpoint == CHAT:
            max_completion = opt_positive_int(body, "max_completion_tokens")
            if max_completion is not None:
                max_tokens = max_completion
        n = opt_positive_int(body, "n", self.max_n) or 1
        seed = body.get("seed")
        if seed is not None and (type(seed) is not int or seed < 0):
            raise BadRequest(f"Invalid 'seed': expected a non-negative integer, got {seed!r}.", "seed")
        messages: list[dict[str, str]] | None = None
        prompt: str | None = None
        if endpoint == CHAT:
            raw = body.get("messages")
            if not isinstance(raw, list) or not raw:
                raise BadRequest("Missing or invalid 'messages': expected a non-empty array.", "messages")
            messages = []
            for i, m in enumerate(raw):
                if not isinstance(m, dict) or type(m.get("role")) is not str:
                    raise BadRequest("Invalid message: expected an object with a string 'role'.", f"messages[{i}]")
                if m.get("tool_calls") or m["role"] in ("tool", "function"):
                    raise BadRequest(f"Tool messages are not supported by the {self.name} engine.", f"messages[{i}]")
                role = "system" if m["role"] == "developer" else m["role"]
                messages.append({"role": role, "content": _text_of(m.get("content"), f"messages[{i}].content")})
        else:
            raw_prompt = body.get("prompt")
            if type(raw_prompt) is str:
                prompt = raw_prompt
            elif isinstance(raw_prompt, list) and len(raw_prompt) == 1 and type(raw_prompt[0]) is str:
                prompt = raw_prompt[0]
            else:
                raise BadRequest("Invalid 'prompt': this engine takes one prompt string per request.", "prompt")
            if body.get("echo") or body.get("suffix") is not None:
                param = "echo" if body.get("echo") else "suffix"
                raise BadRequest(f"'{param}' is not supported by the {self.name} engine.", param)
            if max_tokens is None:
                max_tokens = 16  # OpenAI's completions default
        json_schema: dict[str, Any] | None = None
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
            if fmt["type"] == "json_object":
                json_schema = {}
            else:
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise BadRequest(
                        "Invalid 'response_format': json_schema.schema must be an object.", "response_format"
                    )
                check_json_schema(schema)
                json_schema = schema
        return Generation(
            endpoint=endpoint,
            model=model,
            adapter=model if model in self.adapters else None,
            messages=messages,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_float(body, "top_p", 1.0, 0.0, 1.0),
            stop=stop_strings(body),
            seed=seed,
            n=n,
            frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
            json_schema=json_schema,
        )

    def response(self, gen: Generation) -> EngineResponse:
        """The OpenAI-format body for a finished generation."""
        completion_tokens = sum(c.tokens for c in gen.choices)
        usage = {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": gen.prompt_tokens + completion_tokens,
        }
        fingerprint = f"fp_llmbatch_{self.name}"
        if gen.endpoint == CHAT:
            body: dict[str, Any] = {
                "id": hex_id("chatcmpl-"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": gen.model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in enumerate(gen.choices)
                ],
                "usage": {
                    **usage,
                    "prompt_tokens_details": {"cached_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0},
                },
                "system_fingerprint": fingerprint,
            }
        else:
            body = {
                "id": hex_id("cmpl-"),
                "object": "text_completion",
                "created": int(time.time()),
                "model": gen.model,
                "choices": [
                    {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                    for i, c in enumerate(gen.choices)
                ],
                "usage": usage,
                "system_fingerprint": fingerprint,
            }
        return EngineResponse(200, body, Usage(gen.prompt_tokens, completion_tokens, 0, 0))


def hf_prompt_ids(tokenizer: Any, gen: Generation) -> list[int]:
    """A row's prompt as token ids with a Hugging Face tokenizer (transformers and vllm engines).

    Chat rows go through the tokenizer's chat template, which writes the special tokens (BOS,
    role markers) itself, so the rendered text is encoded without adding more; completions
    prompts get the tokenizer's usual special tokens.
    """
    if gen.messages is None:
        assert gen.prompt is not None
        return list(tokenizer.encode(gen.prompt, add_special_tokens=True))
    rendered = tokenizer.apply_chat_template(gen.messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(rendered, str):  # tokenizers that render straight to ids (Mistral's)
        return list(rendered)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    best = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return (text, False) if best < 0 else (text[:best], True)


@dataclass(slots=True, eq=False)
class _Item:
    generation: Generation
    future: asyncio.Future[None]
    cancelled: bool = False


#: ModelEngine._take: (limit, block) -> queued items; [] when the engine is stopping.
_Take = Callable[[int, bool], "list[_Item]"]
