"""OpenAI's Responses API (`/v1/responses`) as a translation of chat completions.

Clients such as Inspect AI send models they do not know to the Responses API, in batches and
directly. A model engine generates chat answers, so a Responses request is translated to the
chat request it means (instructions as the system message, input items as messages,
`max_output_tokens`, `text.format` as `response_format`), run like any chat row, and its answer
built back into a `response` object. Every model engine (llamacpp, transformers, vllm) goes
through these two functions, so what one serves the others serve alike.

Anything the translation cannot carry (tools, images, a stored conversation) is a 400 naming
the Responses parameter, never silently dropped.
"""

from __future__ import annotations

import time
from typing import Any

from ._request import BadRequest, hex_id, opt_positive_int

__all__ = ["chat_request", "response_object", "responses_error"]

# Text parts of an input message's content: what a user, system or assistant message may hold.
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_ROLES = frozenset({"user", "assistant", "system", "developer"})
# Chat parameters whose Responses names differ, for errors the chat parser raises.
_PARAM_NAMES = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


def responses_error(exc: BadRequest) -> BadRequest:
    """A chat parser's error about a translated request, naming the Responses parameters instead
    ("max_tokens" -> "max_output_tokens"): the caller sent those."""
    message = exc.message
    for chat, responses in _PARAM_NAMES.items():
        message = message.replace(f"'{chat}'", f"'{responses}'")
    param = exc.param
    if param is not None:
        head, dot, rest = param.partition(".")
        head, bracket, index = head.partition("[")
        param = _PARAM_NAMES.get(head, head) + bracket + index + dot + rest
    return BadRequest(message, param)


def chat_request(body: Any, engine: str) -> dict[str, Any]:
    """The chat completions body a Responses request `body` asks for; BadRequest naming the
    Responses parameter for what the `engine` cannot honour."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", None)
    for name, why in (
        ("previous_response_id", "this server keeps no responses: send the whole conversation in 'input'"),
        ("conversation", "this server keeps no conversations: send the whole conversation in 'input'"),
        ("prompt", "this server keeps no prompt templates: send the text in 'input' and 'instructions'"),
    ):
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not supported: {why}.", name)
    if body.get("background"):
        raise BadRequest("'background' is not supported: send the request to the Batch API instead.", "background")
    if body.get("tools"):
        raise BadRequest(f"'tools' is not supported by the {engine} engine.", "tools")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and any(reasoning.get(k) not in (None, "none") for k in ("effort", "summary")):
        raise BadRequest(f"'reasoning' is not supported by the {engine} engine's model.", "reasoning")
    if body.get("top_logprobs"):
        raise BadRequest(f"'top_logprobs' is not supported by the {engine} engine.", "top_logprobs")
    instructions = body.get("instructions")
    if instructions is not None and type(instructions) is not str:
        raise BadRequest("Invalid 'instructions': expected a string.", "instructions")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    messages += _messages(body.get("input"), engine)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    max_output_tokens = opt_positive_int(body, "max_output_tokens")
    if max_output_tokens is not None:
        chat["max_tokens"] = max_output_tokens
    for name in ("temperature", "top_p", "stream"):
        if body.get(name) is not None:
            chat[name] = body[name]
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    return chat


def _messages(items: Any, engine: str) -> list[dict[str, Any]]:
    if type(items) is str:
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("Missing or invalid 'input': expected a string or a non-empty array.", "input")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest("Invalid input item: expected an object.", f"input[{i}]")
        kind = item.get("type", "message")
        if kind != "message":
            raise BadRequest(
                f"Input items of type {kind!r} are not supported by the {engine} engine: it reads text messages.",
                f"input[{i}]",
            )
        role = item.get("role")
        if role not in _ROLES:
            raise BadRequest(f"Invalid 'role': expected one of {', '.join(sorted(_ROLES))}.", f"input[{i}].role")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind not in _TEXT_PARTS or type(part.get("text")) is not str:
                    raise BadRequest(
                        f"Unsupported content part {kind!r}: the {engine} engine's model reads text parts only.",
                        f"input[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        elif type(content) is not str:
            raise BadRequest("Invalid content: expected a string or an array of content parts.", f"input[{i}].content")
        messages.append({"role": role, "content": content})
    return messages


def _response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format` (None: plain text)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise BadRequest("Invalid 'text': expected an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            message = "Invalid 'text.format': a json_schema format needs a 'schema' object."
            raise BadRequest(message, "text.format.schema")
        return {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name") or "response", "schema": schema, "strict": fmt.get("strict")},
        }
    raise BadRequest("Invalid 'text.format': expected type text, json_object or json_schema.", "text.format.type")


def response_object(
    body: dict[str, Any], *, text: str, cut: bool, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """The `response` object answering request `body` with `text` (`cut`: by max_output_tokens)."""
    status = "incomplete" if cut else "completed"
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    return {
        "id": hex_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": [
            {
                "type": "message",
                "id": hex_id("msg_"),
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        ],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": fmt if isinstance(fmt, dict) else {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "metadata": body.get("metadata") or {},
        "usage": {
            "input_tokens": input_tokens,
            # cache_write_tokens: newer openai SDKs declare it required in this object.
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }
