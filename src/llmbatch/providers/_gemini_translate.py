"""OpenAI request bodies to Gemini API requests, and Gemini results back to OpenAI bodies.

Pure functions, no SDK and no I/O: the adapter (`_gemini.py`) and its tests use them. A
request is translated into the REST shape of a `GenerateContentRequest` (camelCase, as in a
batch input file line); anything in an OpenAI body that has no Gemini equivalent is named by
`check_chat` / `check_embeddings` so that the row is reported at ingest, never sent with a
parameter quietly missing.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from . import _chat

__all__ = [
    "CHAT",
    "EMBEDDINGS",
    "check_chat",
    "check_embeddings",
    "chat_request",
    "completion_body",
    "embed_requests",
    "embedding_body",
    "embedding_key",
    "http_status_of",
    "parse_embedding_key",
    "result_line",
]

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"

#: Body keys translated for chat rows (the others are rejected by name).
_CHAT_KEYS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "response_format",
        "n",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "stream",
        "parallel_tool_calls",
    }
)
#: Keys each message role may carry.
_MESSAGE_KEYS = {
    "system": {"role", "content"},
    "developer": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", "refusal"},
    "tool": {"role", "content", "tool_call_id"},
}
_EMBEDDING_KEYS = frozenset({"model", "input", "dimensions", "encoding_format"})

#: Gemini finish reasons that mean the output was withheld or cut by a safety system.
_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)

#: google.rpc.Code names and numbers, and the HTTP status Google maps each to.
_GRPC = {
    1: ("CANCELLED", 499),
    2: ("UNKNOWN", 500),
    3: ("INVALID_ARGUMENT", 400),
    4: ("DEADLINE_EXCEEDED", 504),
    5: ("NOT_FOUND", 404),
    6: ("ALREADY_EXISTS", 409),
    7: ("PERMISSION_DENIED", 403),
    8: ("RESOURCE_EXHAUSTED", 429),
    9: ("FAILED_PRECONDITION", 400),
    10: ("ABORTED", 409),
    11: ("OUT_OF_RANGE", 400),
    12: ("UNIMPLEMENTED", 501),
    13: ("INTERNAL", 500),
    14: ("UNAVAILABLE", 503),
    15: ("DATA_LOSS", 500),
    16: ("UNAUTHENTICATED", 401),
}
_HTTP_OF_NAME = {name.lower(): http for name, http in _GRPC.values()} | _chat.HTTP_STATUS_OF_ERROR

#: Separates a row's custom_id from the input's position in an embedding request's key. The
#: provider's `custom_id_pattern` keeps it out of custom_ids, so a key is never ambiguous.
KEY_SEPARATOR = "#"
_EMBED_KEY = re.compile(r"^(.*)#(\d+)/(\d+)$", re.S)


# -- checking ------------------------------------------------------------------------------


def check_chat(body: dict[str, Any]) -> list[str]:
    """Why a chat completion body cannot run on Gemini (empty: it translates fully)."""
    reasons = [
        f"parameter {k!r} is not supported by Gemini" for k, v in body.items() if k not in _CHAT_KEYS and v is not None
    ]
    if body.get("stream"):
        reasons.append("stream=true: batch requests cannot stream")
    if body.get("parallel_tool_calls") is False:
        reasons.append("parallel_tool_calls=false: Gemini cannot forbid parallel function calls")
    model = body.get("model")
    if isinstance(model, str) and "|" in model:
        reasons.append(f"model {model!r}: Gemini model names have no '|'")
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or n < 1):
        reasons.append("n must be a positive integer")
    reasons += _check_messages(body.get("messages"))
    reasons += _check_tools(body.get("tools"), body.get("tool_choice"))
    reasons += _check_response_format(body.get("response_format"))
    return reasons


def _check_messages(messages: Any) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return ["messages must be a non-empty list"]
    reasons: list[str] = []
    call_ids: set[str] = set()
    turns = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            reasons.append(f"{where} is not an object")
            continue
        role = m.get("role")
        allowed = _MESSAGE_KEYS.get(role)  # type: ignore[arg-type]
        if allowed is None:
            reasons.append(f"{where}: role {role!r} is not supported by Gemini (use system, user, assistant, tool)")
            continue
        extra = sorted(k for k, v in m.items() if k not in allowed and v is not None)
        if extra:
            reasons.append(f"{where}: {', '.join(extra)} not supported by Gemini in a {role} message")
        content = m.get("content")
        if role in ("system", "developer", "tool"):
            reasons += _check_text_only(content, where)
        elif role == "user":
            turns += 1
            reasons += _check_user_content(content, where)
        else:
            turns += 1
            reasons += _check_text_only(content, where)
            if m.get("refusal") is not None:
                reasons.append(f"{where}: an assistant refusal cannot be sent to Gemini")
            for j, call in enumerate(m.get("tool_calls") or []):
                reasons += _check_tool_call(call, f"{where}.tool_calls[{j}]", call_ids)
        if role == "tool":
            turns += 1
            if m.get("tool_call_id") not in call_ids:
                reasons.append(
                    f"{where}: tool_call_id {m.get('tool_call_id')!r} matches no earlier assistant tool call"
                )
    if not turns:
        reasons.append("messages need at least one user or assistant message (Gemini takes system text apart)")
    return reasons


def _check_text_only(content: Any, where: str) -> list[str]:
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list):
        return [f"{where}: content must be a string or a list of parts"]
    return [
        f"{where}: content part of type {p.get('type') if isinstance(p, dict) else p!r} is not supported here"
        for p in content
        if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    ]


def _check_user_content(content: Any, where: str) -> list[str]:
    if isinstance(content, str):
        return []
    if not isinstance(content, list):
        return [f"{where}: content must be a string or a list of parts"]
    reasons = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image_url":
            image = part.get("image_url") or {}
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or _chat.parse_data_url(url) is None:
                reasons.append(f"{at}: Gemini takes images as inline data only: use a base64 data: URL, not a link")
            if isinstance(image, dict) and image.get("detail") not in (None, "auto"):
                reasons.append(f"{at}: image detail {image.get('detail')!r} has no Gemini equivalent (use auto)")
        elif kind == "file":
            file = part.get("file") or {}
            data = file.get("file_data") if isinstance(file, dict) else None
            if not isinstance(data, str) or _chat.parse_data_url(data) is None:
                reasons.append(f"{at}: Gemini takes files as inline data only: use file_data with a data: URL")
        elif kind == "input_audio":
            reasons.append(f"{at}: audio input is not supported by the gemini provider")
        else:
            reasons.append(f"{at}: content part type {kind!r} is not supported by Gemini")
    return reasons


def _check_tool_call(call: Any, where: str, call_ids: set[str]) -> list[str]:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        return [f"{where}: only function tool calls can be sent to Gemini"]
    fn = call.get("function") or {}
    if isinstance(call.get("id"), str):
        call_ids.add(call["id"])
    try:
        args = orjson.loads(fn.get("arguments") or "{}")
    except (orjson.JSONDecodeError, TypeError):
        return [f"{where}: arguments are not valid JSON"]
    if not isinstance(args, dict):
        return [f"{where}: arguments must be a JSON object for Gemini"]
    return []


def _check_tools(tools: Any, tool_choice: Any) -> list[str]:
    reasons = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            kind = tool.get("type") if isinstance(tool, dict) else tool
            reasons.append(f"tools[{i}]: tool type {kind!r} is not supported by Gemini (only function tools)")
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        reasons.append(f"tool_choice {tool_choice!r} is not supported by Gemini")
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            reasons.append("tool_choice: only a named function can be forced on Gemini")
    return reasons


def _check_response_format(fmt: Any) -> list[str]:
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object")):
        return []
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema")
        if isinstance(schema, dict) and isinstance(schema.get("schema", {}), dict):
            return []
        return ["response_format.json_schema must hold a JSON Schema object under 'schema'"]
    return [f"response_format {fmt!r} is not supported by Gemini"]


def check_embeddings(body: dict[str, Any]) -> list[str]:
    """Why an embeddings body cannot run on Gemini's batch embeddings (empty: it can)."""
    reasons = [
        f"parameter {k!r} is not supported by Gemini embeddings"
        for k, v in body.items()
        if k not in _EMBEDDING_KEYS and v is not None
    ]
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        reasons.append("input must be a string or a non-empty list of strings (Gemini takes no token arrays)")
    if body.get("encoding_format") not in (None, "float"):
        reasons.append("encoding_format: the gemini provider returns float embeddings only")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or dims < 1):
        reasons.append("dimensions must be a positive integer")
    return reasons


# -- requests ------------------------------------------------------------------------------


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The REST `GenerateContentRequest` for an OpenAI chat body that passed `check_chat`."""
    system, contents = _contents(body["messages"])
    req: dict[str, Any] = {"contents": contents}
    if system:
        req["systemInstruction"] = {"parts": system}
    config = _generation_config(body)
    if config:
        req["generationConfig"] = config
    tools = body.get("tools")
    if tools:
        req["tools"] = [{"functionDeclarations": [_declaration(t["function"]) for t in tools]}]
    calling = _function_calling(tools, body.get("tool_choice"))
    if calling:
        req["toolConfig"] = {"functionCallingConfig": calling}
    return req


def _contents(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(systemInstruction parts, contents): consecutive turns of one role merged into one."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}

    def add(role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for m in messages:
        role, content = m["role"], m.get("content")
        if role in ("system", "developer"):
            system.extend(_text_parts(content))
        elif role == "user":
            add("user", _user_parts(content))
        elif role == "assistant":
            parts = _text_parts(content)
            for call in m.get("tool_calls") or []:
                fn = call["function"]
                names[call.get("id", "")] = fn["name"]
                part: dict[str, Any] = {
                    "functionCall": {"name": fn["name"], "args": orjson.loads(fn.get("arguments") or "{}")}
                }
                signature = ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")
                if signature:
                    part["thoughtSignature"] = signature
                parts.append(part)
            add("model", parts)
        else:  # tool: Gemini wants the function's name, which only the assistant's call carries
            output = _chat.text_of(content)
            add("user", [{"functionResponse": {"name": names[m["tool_call_id"]], "response": {"output": output}}}])
    return system, contents


def _text_parts(content: Any) -> list[dict[str, Any]]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"text": content}]
    return [{"text": p["text"]} for p in content if p.get("text")]


def _user_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for p in content:
        kind = p["type"]
        if kind == "text":
            if p["text"]:
                parts.append({"text": p["text"]})
            continue
        url = p["image_url"]["url"] if kind == "image_url" else p["file"]["file_data"]
        parsed = _chat.parse_data_url(url)
        assert parsed is not None  # check_chat let only data: URLs through
        parts.append({"inlineData": {"mimeType": parsed[0], "data": parsed[1]}})
    return parts


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is not None:
        config["maxOutputTokens"] = limit
    for openai_name, gemini_name in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
    ):
        if body.get(openai_name) is not None:
            config[gemini_name] = body[openai_name]
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    n = body.get("n")
    if n is not None and n != 1:
        config["candidateCount"] = n
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    elif fmt.get("type") == "json_schema":
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema is not None:
            config["responseJsonSchema"] = schema
    return config


def _declaration(fn: dict[str, Any]) -> dict[str, Any]:
    decl: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description"):
        decl["description"] = fn["description"]
    if fn.get("parameters") is not None:
        decl["parametersJsonSchema"] = fn["parameters"]
    return decl


def _function_calling(tools: Any, choice: Any) -> dict[str, Any] | None:
    """Gemini's functionCallingConfig for a tool_choice; `strict` tools ask for VALIDATED mode,
    in which Gemini holds function arguments to their schema."""
    strict = any((t.get("function") or {}).get("strict") for t in tools or [])
    if choice == "none":
        return {"mode": "NONE"}
    if choice == "required":
        return {"mode": "ANY"}
    if isinstance(choice, dict):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    if strict:
        return {"mode": "VALIDATED"}
    if choice == "auto":
        return {"mode": "AUTO"}
    return None


def embed_requests(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One REST `EmbedContentRequest` per input text of an OpenAI embeddings body."""
    texts = body["input"]
    if isinstance(texts, str):
        texts = [texts]
    model = body["model"] if body["model"].startswith("models/") else f"models/{body['model']}"
    reqs = []
    for text in texts:
        req: dict[str, Any] = {"model": model, "content": {"parts": [{"text": text}]}}
        if body.get("dimensions") is not None:
            req["outputDimensionality"] = body["dimensions"]
        reqs.append(req)
    return reqs


def embedding_key(custom_id: str, index: int, count: int) -> str:
    """The key of one input of an embeddings row (rows with several inputs become several requests)."""
    return f"{custom_id}{KEY_SEPARATOR}{index}/{count}"


def parse_embedding_key(key: str) -> tuple[str, int, int] | None:
    """(custom_id, index, count) of an embedding key; None for a chat key."""
    m = _EMBED_KEY.match(key)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


# -- results -------------------------------------------------------------------------------


def http_status_of(error: dict[str, Any]) -> int:
    """The HTTP status for a per-request error: its code when that is an HTTP code, else by name."""
    code, name = error.get("code"), error.get("status")
    if isinstance(code, int) and 100 <= code <= 599:
        return code
    if isinstance(name, str) and name.lower() in _HTTP_OF_NAME:
        return _HTTP_OF_NAME[name.lower()]
    if isinstance(code, int) and code in _GRPC:
        return _GRPC[code][1]
    return 500


def _error_type(error: dict[str, Any]) -> str:
    name = error.get("status")
    if not isinstance(name, str) and isinstance(error.get("code"), int) and error["code"] in _GRPC:
        name = _GRPC[error["code"]][0]
    return name.lower() if isinstance(name, str) else "api_error"


def result_line(custom_id: str, item: dict[str, Any], *, model: str, created: int) -> dict[str, Any]:
    """The OpenAI batch output line for one Gemini chat result (`{response}` or `{error}`)."""
    error = item.get("error")
    if error:
        message = error.get("message") or "the request failed"
        return _chat.error_result(custom_id, http_status_of(error), message, type=_error_type(error), native=item)
    response = item.get("response")
    if not isinstance(response, dict):
        return _chat.error_result(custom_id, 500, "Gemini returned neither a response nor an error", native=item)
    body = completion_body(response, custom_id=custom_id, model=model, created=created)
    return _chat.result_line(custom_id, 200, body, request_id=response.get("responseId"), native=item)


def completion_body(response: dict[str, Any], *, custom_id: str, model: str, created: int) -> dict[str, Any]:
    """An OpenAI chat completion for a `GenerateContentResponse`: one choice per candidate."""
    usage = response.get("usageMetadata") or {}
    thoughts = usage.get("thoughtsTokenCount") or 0
    counts = {
        "prompt_tokens": (usage.get("promptTokenCount") or 0) + (usage.get("toolUsePromptTokenCount") or 0),
        "completion_tokens": (usage.get("candidatesTokenCount") or 0) + thoughts,
        "cached_tokens": usage.get("cachedContentTokenCount") or 0,
        "reasoning_tokens": thoughts,
    }
    common = {
        "id": response.get("responseId") or "chatcmpl-" + _digest(custom_id)[:24],
        "model": response.get("modelVersion") or model,
        "created": created,
    }
    candidates = response.get("candidates") or []
    if not candidates:  # the prompt itself was blocked
        blocked = (response.get("promptFeedback") or {}).get("blockReason")
        return _chat.chat_completion(
            **common, content=None, finish_reason="content_filter" if blocked else "stop", **counts
        )
    choices = []
    for i, candidate in enumerate(candidates):
        text, calls, finish = _candidate(candidate, f"{custom_id}/{i}")
        one = _chat.chat_completion(**common, content=text, finish_reason=finish, tool_calls=calls, **counts)
        choice = one["choices"][0]
        choice["index"] = i
        choices.append(choice)
    one["choices"] = choices
    return one


def _candidate(candidate: dict[str, Any], seed: str) -> tuple[str | None, list[dict[str, Any]], str]:
    """(text, tool calls, OpenAI finish reason) of one candidate; thought parts are left out."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, part in enumerate((candidate.get("content") or {}).get("parts") or []):
        if part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        fc = part.get("functionCall")
        if isinstance(fc, dict):
            call: dict[str, Any] = {
                "id": fc.get("id") or "call_" + _digest(f"{seed}/{j}")[:24],
                "type": "function",
                "function": {"name": fc.get("name"), "arguments": orjson.dumps(fc.get("args") or {}).decode()},
            }
            if part.get("thoughtSignature"):  # Gemini 3 wants it back with the call in a later turn
                call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
            calls.append(call)
    reason = candidate.get("finishReason")
    if reason == "MAX_TOKENS":
        finish = "length"
    elif reason in _FILTERED:
        finish = "content_filter"
    elif calls:
        finish = "tool_calls"
    else:
        finish = "stop"
    text = "".join(texts) if texts or not calls else None
    return text, calls, finish


def embedding_body(vectors: list[list[float]], *, model: str, prompt_tokens: int = 0) -> dict[str, Any]:
    """An OpenAI embeddings response body for a row's vectors, in input order."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
