"""OpenAI chat completion requests to Anthropic Messages parameters, and Anthropic results back.

`translate_request(body)` turns a `/v1/chat/completions` body into Messages API `params` and
lists every reason it cannot (`check_request` reports those at ingest, with file and line).
Nothing is dropped silently: a parameter is translated, or neutral (its OpenAI default, or
null), or the row is refused naming it.

Translated:
- messages: `system`/`developer` turns (text) into `system`, wherever they stand; `user` and
  `assistant` text; images (`data:` URLs as base64 sources, http(s) URLs as url sources);
  PDFs given as `file.file_data` data URLs as document blocks; assistant `tool_calls` as
  `tool_use` blocks; `tool` turns as `tool_result` blocks in a user turn. Consecutive turns of
  one role are merged, as Anthropic wants user and assistant to alternate. A `cache_control`
  on a content part (an Anthropic extension some OpenAI clients send) is kept on its block.
- `max_completion_tokens` / `max_tokens` (Anthropic requires one: rows with neither get
  `DEFAULT_MAX_TOKENS` = 4096), `stop` (stop_sequences; whitespace-only ones are refused,
  as Anthropic refuses them), `temperature` (0 to 1) and `top_p` (not both, as Anthropic's
  current models refuse both; neither for models from Opus 4.7 on, which refuse sampling
  parameters, unless left at 1, the default), function `tools`, `tool_choice`,
  `parallel_tool_calls: false` (disable_parallel_tool_use), `user` / `safety_identifier`
  (metadata.user_id), `response_format` `json_schema` (structured outputs,
  `output_config.format`, the schema adapted by the SDK's `transform_schema`, which moves
  constraints Anthropic does not enforce into descriptions), `reasoning_effort` low to
  xhigh (`output_config.effort`).

Results: text blocks joined into `content`, `tool_use` blocks into `tool_calls`, stop reasons
onto OpenAI's finish reasons, usage with cached (cache reads) and reasoning (thinking) tokens;
the Anthropic result object rides along under `"native"`.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

from ._chat import (
    HTTP_STATUS_OF_ERROR,
    NEUTRAL_PARAMS,
    chat_completion,
    error_result,
    not_run_line,
    parse_data_url,
    result_line,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Untranslatable",
    "chat_completion_of",
    "error_body",
    "openai_line",
    "status_of_error",
    "to_messages_params",
    "translate_request",
]

#: max_tokens for rows that set neither max_tokens nor max_completion_tokens.
DEFAULT_MAX_TOKENS = 4096

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_EFFORTS = frozenset({"low", "medium", "high", "xhigh"})
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: Error types `_chat.HTTP_STATUS_OF_ERROR` does not know.
_MORE_ERROR_STATUS = {"conflict_error": 409, "memory_path_conflict_error": 409, "memory_precondition_failed_error": 412}

#: Why the parameters Anthropic has no counterpart for are refused.
_NO_COUNTERPART = {
    "n": "Anthropic returns one choice per request",
    "stream": "batch requests cannot stream",
    "stream_options": "batch requests cannot stream",
    "logprobs": "Anthropic does not return log probabilities",
    "top_logprobs": "Anthropic does not return log probabilities",
    "logit_bias": "Anthropic has no logit bias",
    "presence_penalty": "Anthropic has no presence penalty",
    "frequency_penalty": "Anthropic has no frequency penalty",
    "seed": "Anthropic has no sampling seed",
    "store": "Anthropic does not store completions",
    "metadata": "OpenAI's stored-completion metadata has no Anthropic counterpart",
    "audio": "Anthropic does not produce audio",
    "modalities": "Anthropic produces text only",
    "prediction": "Anthropic has no predicted outputs",
    "service_tier": "batches run on Anthropic's batch tier",
    "functions": "use `tools` instead of the deprecated `functions`",
    "function_call": "use `tool_choice` instead of the deprecated `function_call`",
    "web_search_options": "OpenAI's web search is not translated",
    "verbosity": "Anthropic has no verbosity setting",
    "prompt_cache_key": "Anthropic caches by `cache_control` on content parts, not by key",
    "prompt_cache_retention": "Anthropic caches by `cache_control` on content parts",
}
_TRANSLATED = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "tools",
        "tool_choice", "parallel_tool_calls", "user", "safety_identifier", "response_format", "reasoning_effort",
    }
)  # fmt: skip
#: Claude models that refuse sampling parameters: Opus 4.7 on, every generation-5 model.
_MODEL_VERSION = re.compile(r"claude-(opus|sonnet|haiku)-(\d+)(?:-(\d{1,2}))?(?:-\d{8})?(?:[@:-].*)?$")
_NO_SAMPLING_FAMILIES = re.compile(r"claude-(fable|mythos)\b")


class Untranslatable(ValueError):
    """A request this adapter cannot send to Anthropic; `reasons` says why, one per problem."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def _refuses_sampling(model: str) -> bool:
    if _NO_SAMPLING_FAMILIES.search(model):
        return True
    m = _MODEL_VERSION.search(model)
    if m is None:
        return False  # unknown names (aliases, future families) are sent; the API answers per row
    major, minor = int(m.group(2)), int(m.group(3) or 0)
    return (major, minor) >= (4, 7)


def translate_request(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(Messages API params, reasons the body cannot be sent); the params are complete only without reasons."""
    reasons: list[str] = []
    params: dict[str, Any] = {"model": body.get("model")}
    for key, value in body.items():
        if key in _TRANSLATED or value is None:
            continue
        if key in NEUTRAL_PARAMS and value in NEUTRAL_PARAMS[key]:
            continue
        if key in _NO_COUNTERPART:
            reasons.append(f"{key}={_short(value)}: {_NO_COUNTERPART[key]}")
        else:
            reasons.append(f"{key}: not a chat completion parameter this provider translates")

    system, messages = _translate_messages(body.get("messages"), reasons)
    if system:
        params["system"] = system
    params["messages"] = messages
    params["max_tokens"] = _max_tokens(body, reasons)
    _sampling(body, params, reasons)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            reasons.append("stop: must be a string or a list of strings")
        elif any(not s.strip() for s in stops):
            reasons.append(f"stop={_short(stop)}: Anthropic refuses empty and whitespace-only stop sequences")
        elif stops:
            params["stop_sequences"] = stops
    _tools(body, params, reasons)
    user, ident = body.get("user"), body.get("safety_identifier")
    if user is not None and ident is not None and user != ident:
        reasons.append("user and safety_identifier differ: Anthropic takes one user id (metadata.user_id)")
    elif (ident or user) is not None:
        if not isinstance(ident or user, str):
            reasons.append("user: must be a string")
        else:
            params["metadata"] = {"user_id": ident or user}
    output_config: dict[str, Any] = {}
    _response_format(body.get("response_format"), output_config, reasons)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort in _EFFORTS:
            output_config["effort"] = effort
        else:
            levels = ", ".join(sorted(_EFFORTS))
            reasons.append(f"reasoning_effort={_short(effort)}: Anthropic's effort levels are {levels}")
    if output_config:
        params["output_config"] = output_config
    return params, reasons


def to_messages_params(body: dict[str, Any]) -> dict[str, Any]:
    """Messages API params for an OpenAI chat body; raises `Untranslatable` with every reason it cannot."""
    params, reasons = translate_request(body)
    if reasons:
        raise Untranslatable(reasons)
    return params


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _max_tokens(body: dict[str, Any], reasons: list[str]) -> int:
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            reasons.append(f"{key}={_short(value)}: must be a positive integer")
            return DEFAULT_MAX_TOKENS
    if len(set(given.values())) > 1:
        reasons.append("max_completion_tokens and max_tokens differ: Anthropic takes one max_tokens")
    return next(iter(given.values()), DEFAULT_MAX_TOKENS)


def _sampling(body: dict[str, Any], params: dict[str, Any], reasons: list[str]) -> None:
    model = str(body.get("model") or "")
    temperature, top_p = body.get("temperature"), body.get("top_p")
    bad = []
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            bad.append(f"{key}={_short(value)}: must be a number")
        elif not 0 <= value <= 1:
            bad.append(f"{key}={value}: Anthropic's range is 0 to 1")
    if bad:
        reasons.extend(bad)
        return
    no_sampling = _refuses_sampling(model)
    # 1 is the default of both: leaving it out changes nothing, where sending it would be refused
    # (by models without sampling parameters, or beside the other one).
    top_p = None if top_p == 1 else top_p
    temperature = None if temperature == 1 and (no_sampling or top_p is not None) else temperature
    if no_sampling:
        for key, value in (("temperature", temperature), ("top_p", top_p)):
            if value is not None:
                reasons.append(f"{key}={value}: {model} takes no sampling parameters (Claude from Opus 4.7 on)")
        return
    if temperature is not None and top_p is not None:
        reasons.append("temperature and top_p: Anthropic's current models take one or the other, not both")
        return
    if temperature is not None:
        params["temperature"] = temperature
    if top_p is not None:
        params["top_p"] = top_p


def _tools(body: dict[str, Any], params: dict[str, Any], reasons: list[str]) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            reasons.append("tools: must be a list")
            return
        out = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
                reasons.append(f"tools[{i}]: only function tools are translated, not {kind!r}")
                continue
            spec: dict[str, Any] = {
                "name": fn.get("name"),
                "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
            }
            if fn.get("description"):
                spec["description"] = fn["description"]
            if fn.get("strict") is not None:
                spec["strict"] = bool(fn["strict"])
            out.append(spec)
        if out:
            params["tools"] = out
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if not params.get("tools"):
        if choice not in (None, "none", "auto"):
            reasons.append(f"tool_choice={_short(choice)}: no tools to choose from")
        return
    translated: dict[str, Any] | None
    if choice is None or choice == "auto":
        translated = {"type": "auto"}
    elif choice == "none":
        translated = {"type": "none"}
    elif choice == "required":
        translated = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        translated = {"type": "tool", "name": choice["function"].get("name")}
    else:
        reasons.append(f"tool_choice={_short(choice)}: not translated (auto, none, required or one function)")
        return
    if parallel is False and translated["type"] != "none":
        translated["disable_parallel_tool_use"] = True
    if choice is not None or parallel is False:
        params["tool_choice"] = translated


def _response_format(fmt: Any, output_config: dict[str, Any], reasons: list[str]) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        reasons.append(
            "response_format=json_object: Anthropic has no schema-less JSON mode; use a json_schema response_format"
        )
        return
    spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if kind != "json_schema" or not isinstance(schema, dict):
        reasons.append(f"response_format={_short(fmt)}: only text and json_schema (with a schema) are translated")
        return
    try:
        from anthropic import transform_schema  # the SDK's adapter to the schema subset Anthropic enforces
    except ImportError:
        reasons.append("response_format json_schema: structured outputs need a newer SDK: pip install -U anthropic")
        return
    try:
        output_config["format"] = {"type": "json_schema", "schema": transform_schema(schema)}
    except (ValueError, TypeError, KeyError, AssertionError) as exc:
        reasons.append(f"response_format: the JSON schema cannot be used for Anthropic structured outputs ({exc})")


# -- messages ------------------------------------------------------------------------------


def _translate_messages(messages: Any, reasons: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, alternating user/assistant turns)."""
    if not isinstance(messages, list) or not messages:
        reasons.append("messages: must be a non-empty list")
        return [], []
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            reasons.append(f"{where}: must be an object")
            continue
        role = msg.get("role")
        for key in ("name", "audio", "function_call", "refusal"):
            if msg.get(key) is not None:
                reasons.append(f"{where}.{key}: Anthropic messages have no {key}")
        content = msg.get("content")
        if role in ("system", "developer"):
            system.extend(_text_blocks(content, f"{where}.content", reasons))
        elif role == "user":
            blocks = _user_blocks(content, f"{where}.content", reasons)
            if not blocks:
                reasons.append(f"{where}: a user message needs non-empty content")
            add("user", blocks)
        elif role == "assistant":
            blocks = _text_blocks(content, f"{where}.content", reasons)
            blocks += _tool_uses(msg.get("tool_calls"), f"{where}.tool_calls", reasons)
            if not blocks:
                reasons.append(f"{where}: an assistant message needs content or tool_calls (no empty turns)")
            add("assistant", blocks)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                reasons.append(f"{where}.tool_call_id: required")
                continue
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
            text = _text_blocks(content, f"{where}.content", reasons)
            if text:
                result["content"] = text
            add("user", [result])
        else:
            reasons.append(f"{where}.role={_short(role)}: not translated (system, developer, user, assistant, tool)")
    if not turns:
        reasons.append("messages: Anthropic needs a user or assistant message besides the system prompt")
    return system, turns


def _cache_control(part: dict[str, Any], block: dict[str, Any], where: str, reasons: list[str]) -> None:
    cc = part.get("cache_control")
    if cc is None:
        return
    if isinstance(cc, dict) and cc.get("type") == "ephemeral" and set(cc) <= {"type", "ttl"}:
        block["cache_control"] = cc
    else:
        reasons.append(f'{where}.cache_control: must be {{"type": "ephemeral"}} (optionally with a ttl)')


def _text_blocks(content: Any, where: str, reasons: list[str]) -> list[dict[str, Any]]:
    """Text content (a string or text parts) as text blocks; empty text is left out, as Anthropic refuses it."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        reasons.append(f"{where}: must be a string or a list of parts")
        return []
    blocks = (_text_part(part, f"{where}[{j}]", reasons) for j, part in enumerate(content))
    return [b for b in blocks if b is not None]


def _text_part(part: Any, where: str, reasons: list[str]) -> dict[str, Any] | None:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        reasons.append(f"{where}: only text parts are translated here, not {kind!r}")
        return None
    if not part["text"]:
        return None
    block = {"type": "text", "text": part["text"]}
    _cache_control(part, block, where, reasons)
    return block


def _user_blocks(content: Any, where: str, reasons: list[str]) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_blocks(content, where, reasons)
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if (text := _text_part(part, at, reasons)) is not None:
                blocks.append(text)
            continue
        if kind == "image_url":
            block = _image(part.get("image_url"), at, reasons)
        elif kind == "file":
            block = _document(part.get("file"), at, reasons)
        else:
            reasons.append(f"{at}: {kind or type(part).__name__!r} parts are not translated (text, image_url, file)")
            continue
        if block is not None:
            _cache_control(part, block, at, reasons)
            blocks.append(block)
    return blocks


def _image(spec: Any, where: str, reasons: list[str]) -> dict[str, Any] | None:
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        reasons.append(f"{where}.image_url.url: required")
        return None
    detail = spec.get("detail") if isinstance(spec, dict) else None
    if detail not in (None, "auto", "high"):
        reasons.append(f"{where}.image_url.detail={detail!r}: Claude reads images at full resolution only")
        return None
    if url.startswith("data:"):
        parsed = parse_data_url(url)
        if parsed is None:
            reasons.append(f"{where}: not a base64 data URL")
            return None
        media_type, data = parsed
        if media_type not in _IMAGE_TYPES:
            reasons.append(f"{where}: Anthropic takes {', '.join(sorted(_IMAGE_TYPES))} images, not {media_type}")
            return None
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    reasons.append(f"{where}: image URLs must be http(s) or data: URLs")
    return None


def _document(spec: Any, where: str, reasons: list[str]) -> dict[str, Any] | None:
    if not isinstance(spec, dict) or spec.get("file_id") is not None or not isinstance(spec.get("file_data"), str):
        reasons.append(f"{where}: only inline files (file.file_data, a PDF data URL) are translated, not file_id")
        return None
    parsed = parse_data_url(spec["file_data"])
    if parsed is None or parsed[0] != "application/pdf":
        reasons.append(f"{where}: file.file_data must be a base64 data:application/pdf URL")
        return None
    source = {"type": "base64", "media_type": "application/pdf", "data": parsed[1]}
    block: dict[str, Any] = {"type": "document", "source": source}
    if isinstance(spec.get("filename"), str) and spec["filename"]:
        block["title"] = spec["filename"]
    return block


def _tool_uses(calls: Any, where: str, reasons: list[str]) -> list[dict[str, Any]]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        reasons.append(f"{where}: must be a list")
        return []
    blocks = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or call.get("type", "function") != "function" or not call.get("id"):
            reasons.append(f"{where}[{j}]: only function calls with an id are translated")
            continue
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            reasons.append(f"{where}[{j}].function.arguments: must be a JSON object (Anthropic's tool input)")
            continue
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn.get("name"), "input": args})
    return blocks


# -- results -------------------------------------------------------------------------------


def status_of_error(error_type: str | None) -> int:
    """The HTTP status of an Anthropic error type (unknown types: 500, retried)."""
    if error_type is None:
        return 500
    return HTTP_STATUS_OF_ERROR.get(error_type) or _MORE_ERROR_STATUS.get(error_type, 500)


def error_body(error: Any, fallback: str = "error") -> dict[str, Any]:
    """OpenAI's error body for Anthropic's `{"type": "error", "error": {type, message}}` envelope."""
    inner = error.get("error") if isinstance(error, dict) else None
    inner = inner if isinstance(inner, dict) else {}
    kind = inner.get("type") or "api_error"
    return {"error": {"message": inner.get("message") or fallback, "type": kind, "param": None, "code": None}}


def chat_completion_of(message: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """An OpenAI chat completion body for an Anthropic Message."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            fn = {"name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}
            tool_calls.append({"id": block.get("id"), "type": "function", "function": fn})
    stop_reason = message.get("stop_reason")
    refusal = None
    if stop_reason == "refusal":
        details = message.get("stop_details") or {}
        refusal = details.get("explanation") or "the model declined to answer (stop_reason: refusal)"
    usage = message.get("usage") or {}
    cache_read = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + cache_read + (usage.get("cache_creation_input_tokens") or 0)
    thinking = (usage.get("output_tokens_details") or {}).get("thinking_tokens") or 0
    return chat_completion(
        id=message.get("id") or "",
        model=message.get("model") or "",
        created=created if created is not None else int(time.time()),
        content="".join(texts) if texts or not tool_calls else None,
        finish_reason=_FINISH.get(stop_reason or "end_turn", "stop"),
        prompt_tokens=prompt,
        completion_tokens=usage.get("output_tokens") or 0,
        cached_tokens=cache_read,
        reasoning_tokens=thinking,
        tool_calls=tool_calls or None,
        refusal=refusal,
    )


def openai_line(rec: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    """An OpenAI batch output line for one Anthropic result line `{"custom_id", "result"}`."""
    cid = rec.get("custom_id")
    result = rec.get("result") or {}
    kind = result.get("type")
    if kind == "succeeded":
        message = result.get("message") or {}
        body = chat_completion_of(message, created)
        return result_line(cid, 200, body, request_id=message.get("id"), native=result)  # type: ignore[arg-type]
    if kind == "errored":
        body = error_body(result.get("error"))
        err = body["error"]
        return error_result(cid, status_of_error(err["type"]), err["message"], type=err["type"], native=result)  # type: ignore[arg-type]
    if kind == "canceled":
        return not_run_line(cid, "batch_cancelled", "the batch was cancelled before this request ran", native=result)  # type: ignore[arg-type]
    if kind == "expired":
        return not_run_line(cid, "batch_expired", "the batch expired before this request ran", native=result)  # type: ignore[arg-type]
    return error_result(cid, 500, f"unknown Anthropic result type {kind!r}", native=result)  # type: ignore[arg-type]
