"""OpenAI chat completion bodies to the InvokeModel bodies of the model families Bedrock batches,
and their answers back to chat completions.

A Bedrock batch record's `modelInput` is the model's own InvokeModel body, so each family has
its shape (AWS Bedrock user guide, "Inference request parameters and response fields for
foundation models", read 2026-12):

- Claude (`anthropic.claude-...`): an Anthropic Messages body (`_anthropic_translate`) with
  `anthropic_version: bedrock-2023-05-31` and no `model`; the answer is a Messages response.
- Meta Llama 3 and later (`meta.llama3-...`, `meta.llama4-...`): `{prompt, max_gen_len,
  temperature, top_p}`, the conversation written with Llama 3's chat template
  (`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>`, ending with
  the assistant's header); the answer is `{generation, prompt_token_count,
  generation_token_count, stop_reason: stop | length}`.
- Mistral (`mistral.*`, the text completion API): `{prompt, max_tokens, temperature, top_p,
  stop}`, the conversation as `<s>[INST] user [/INST] assistant</s>[INST] ... [/INST]` (a system
  message goes before the first user text, as Mistral's template has no system turn); the
  answer is `{outputs: [{text, stop_reason: stop | length}]}`, without token counts (a direct
  call reads them from InvokeModel's `X-Amzn-Bedrock-*-Token-Count` headers).
- Amazon Nova (`amazon.nova-...`): `{schemaVersion: messages-v1, system: [{text}], messages:
  [{role, content: [{text}]}], inferenceConfig: {maxTokens, temperature, topP,
  stopSequences}}`; the answer is `{output: {message: {content: [{text}]}}, stopReason,
  usage: {inputTokens, outputTokens}}`.

Batch inference takes no tool calling and no structured output (the user guide's batch
inference page), so `tools` and a `response_format` other than text are refused for every
family; the native families also take text only (no images), one choice, no log
probabilities, seeds or penalties, and a conversation of system, user and assistant text.
Everything refused is named at ingest, with the file and line.
"""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Any

from ._anthropic_translate import Untranslatable, chat_completion_of, translate_request
from ._chat import NEUTRAL_PARAMS, chat_completion, text_of

__all__ = [
    "ANTHROPIC_VERSION",
    "Family",
    "completion_of",
    "family_of",
    "model_input",
    "request_reasons",
]

ANTHROPIC_VERSION = "bedrock-2023-05-31"


class Family(StrEnum):
    """The InvokeModel body shapes this adapter writes."""

    CLAUDE = "claude"
    LLAMA = "llama"
    MISTRAL = "mistral"
    NOVA = "nova"


# A model id, an inference profile (`us.`, `eu.`, `global.` ...) or an ARN ending in either.
_FAMILIES = (
    (re.compile(r"(^|[.:/])anthropic\.claude"), Family.CLAUDE),
    (re.compile(r"(^|[.:/])meta\.llama(3|4)"), Family.LLAMA),
    (re.compile(r"(^|[.:/])mistral\.(mistral|mixtral)"), Family.MISTRAL),
    (re.compile(r"(^|[.:/])amazon\.nova-(micro|lite|pro|premier|2-lite)"), Family.NOVA),
)
#: Parameters fine at these values; others are refused for the native families (which have no
#: tools, so either parallel_tool_calls changes nothing).
_NEUTRAL: dict[str, tuple[Any, ...]] = {**NEUTRAL_PARAMS, "parallel_tool_calls": (True, False)}
_TAKEN = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {"stop": "stop", "length": "length", "end_turn": "stop", "stop_sequence": "stop",
           "max_tokens": "length", "content_filtered": "content_filter", "tool_use": "tool_calls"}  # fmt: skip


def family_of(model: str) -> Family | None:
    for pattern, family in _FAMILIES:
        if pattern.search(model):
            return family
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _batch_reasons(body: dict[str, Any]) -> list[str]:
    """What Bedrock's batch inference takes from no model."""
    reasons = []
    for key in ("tools", "tool_choice", "functions", "function_call"):
        if body.get(key) is not None:
            reasons.append(f"{key}: Bedrock batch inference takes no tool calling")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        reasons.append(f"response_format={_short(fmt)}: Bedrock batch inference takes no structured output")
    return reasons


def _turns(family: Family, messages: Any, reasons: list[str]) -> list[tuple[str, str]]:
    """(role, text) of each message: system, user or assistant text only."""
    if not isinstance(messages, list) or not messages:
        reasons.append("messages: must be a non-empty list")
        return []
    turns: list[tuple[str, str]] = []
    for n, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _ROLES:
            reasons.append(f"messages[{n}]: role {role!r} is not translated for {family} (system, user, assistant)")
            continue
        if m.get("tool_calls"):
            reasons.append(f"messages[{n}]: tool calls are not translated for {family} models")
        content = m.get("content")
        if isinstance(content, list):
            kinds = {p.get("type") if isinstance(p, dict) else None for p in content} - {"text"}
            if kinds:
                reasons.append(f"messages[{n}]: {family} models take text only here, not {sorted(map(str, kinds))}")
        elif content is not None and not isinstance(content, str):
            reasons.append(f"messages[{n}]: content must be a string or a list of parts")
        turns.append((_ROLES[role], text_of(content)))
    return turns


def _common(family: Family, body: dict[str, Any], reasons: list[str]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The turns and the generation settings (max_tokens, temperature, top_p, stop) of a native-family body."""
    for key, value in body.items():
        if key in _TAKEN or value is None or key in ("tools", "tool_choice", "response_format"):
            continue
        if key in _NEUTRAL and value in _NEUTRAL[key]:
            continue
        reasons.append(f"{key}={_short(value)}: not translated for {family} models on Bedrock")
    turns = _turns(family, body.get("messages"), reasons)
    settings: dict[str, Any] = {}
    given = {k: body[k] for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            reasons.append(f"{key}={_short(value)}: must be a positive integer")
    if len(set(given.values())) > 1:
        reasons.append("max_completion_tokens and max_tokens differ")
    if given:
        settings["max_tokens"] = next(iter(given.values()))
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            reasons.append(f"{key}={_short(value)}: must be a number from 0 to 1")
        else:
            settings[key] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            reasons.append("stop: must be a string or a list of strings")
        elif family is Family.LLAMA:
            reasons.append(f"stop={_short(stop)}: Llama on Bedrock takes no stop sequences")
        elif stops:
            settings["stop"] = stops
    return turns, settings


def _alternating(
    family: Family, turns: list[tuple[str, str]], reasons: list[str], *, last_user: bool
) -> list[list[Any]]:
    """[role, [texts]] with the system turns left out and consecutive turns of one role merged;
    the first must be the user's (and the last too, where the format cannot continue an answer)."""
    merged: list[list[Any]] = []
    for role, text in turns:
        if role == "system":
            continue
        if merged and merged[-1][0] == role:
            merged[-1][1].append(text)
        else:
            merged.append([role, [text]])
    if not merged or merged[0][0] != "user":
        reasons.append(f"messages: {family} models need the first non-system message to be the user's")
    elif last_user and merged[-1][0] != "user":
        reasons.append(f"messages: {family} models need the last message to be the user's")
    return merged


def _llama(body: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    turns, settings = _common(Family.LLAMA, body, reasons)
    if turns and turns[-1][0] == "assistant":
        reasons.append("messages: Llama models need the last message to be the user's")
    prompt = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>" for role, text in turns
    )
    out: dict[str, Any] = {"prompt": prompt + "<|start_header_id|>assistant<|end_header_id|>\n\n"}
    if "max_tokens" in settings:
        out["max_gen_len"] = settings["max_tokens"]
    out.update({k: settings[k] for k in ("temperature", "top_p") if k in settings})
    return out


def _mistral(body: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    turns, settings = _common(Family.MISTRAL, body, reasons)
    system = "\n\n".join(text for role, text in turns if role == "system")
    merged = _alternating(Family.MISTRAL, turns, reasons, last_user=True)
    prompt = "<s>"
    for n, (role, texts) in enumerate(merged):
        text = "\n\n".join(texts)
        if role == "user":
            if n == 0 and system:
                text = f"{system}\n\n{text}"
            # AWS's multi-turn example: `... [/INST] answer</s> [INST] next [/INST]`.
            prompt += f"{' ' if n else ''}[INST] {text} [/INST]"
        else:
            prompt += f" {text}</s>"
    out: dict[str, Any] = {"prompt": prompt}
    out.update({k: settings[k] for k in ("max_tokens", "temperature", "top_p", "stop") if k in settings})
    return out


def _nova(body: dict[str, Any], reasons: list[str]) -> dict[str, Any]:
    turns, settings = _common(Family.NOVA, body, reasons)
    merged = _alternating(Family.NOVA, turns, reasons, last_user=False)
    out: dict[str, Any] = {"schemaVersion": "messages-v1"}
    system = [{"text": text} for role, text in turns if role == "system"]
    if system:
        out["system"] = system
    out["messages"] = [{"role": role, "content": [{"text": t} for t in texts]} for role, texts in merged]
    names = {"max_tokens": "maxTokens", "temperature": "temperature", "top_p": "topP", "stop": "stopSequences"}
    config = {names[k]: v for k, v in settings.items()}
    if config:
        out["inferenceConfig"] = config
    return out


def _translate(model: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    family = family_of(model)
    if family is None:
        return {}, [
            f"model {model!r}: the bedrock provider batches Claude (anthropic.claude-...), Llama 3 and 4 "
            "(meta.llama3-..., meta.llama4-...), Mistral (mistral.mistral-..., mistral.mixtral-...) and "
            "Nova (amazon.nova-...) models"
        ]
    reasons = _batch_reasons(body)
    if family is Family.CLAUDE:
        params, more = translate_request({k: v for k, v in body.items() if k not in ("tools", "tool_choice")})
        params.pop("model", None)
        return {"anthropic_version": ANTHROPIC_VERSION, **params}, reasons + [
            r for r in more if not r.startswith("response_format")
        ]
    builder = {Family.LLAMA: _llama, Family.MISTRAL: _mistral, Family.NOVA: _nova}[family]
    return builder(body, reasons), reasons


def request_reasons(model: str, body: dict[str, Any]) -> list[str]:
    """Why `body` cannot go to Bedrock as `model`'s InvokeModel body; empty when it can."""
    return _translate(model, body)[1]


def model_input(model: str, body: dict[str, Any]) -> dict[str, Any]:
    """The InvokeModel body of a chat completion request for `model`; raises `Untranslatable`."""
    out, reasons = _translate(model, body)
    if reasons:
        raise Untranslatable(reasons)
    return out


def completion_of(
    output: dict[str, Any], model: str, created: int, *, id: str | None = None, tokens: tuple[int, int] | None = None
) -> dict[str, Any]:
    """An OpenAI chat completion body for an InvokeModel answer, whichever family's shape it has
    (told apart by its fields, so that results read without knowing the job's model).
    `tokens`: (input, output) where the answer has no counts (Mistral's: InvokeModel's headers)."""
    ident = id or f"chatcmpl-bedrock-{uuid.uuid4().hex}"
    if output.get("type") == "message" or "anthropic_version" in output:
        completion = chat_completion_of(output, created)
        completion["model"] = completion["model"] or model
        return completion
    if "generation" in output:  # Llama
        text, reason = output.get("generation") or "", output.get("stop_reason")
        counts = (output.get("prompt_token_count") or 0, output.get("generation_token_count") or 0)
    elif isinstance(output.get("outputs"), list):  # Mistral
        first = output["outputs"][0] if output["outputs"] else {}
        text, reason = first.get("text") or "", first.get("stop_reason")
        counts = tokens or (0, 0)
    elif isinstance(output.get("output"), dict):  # Nova
        message = output["output"].get("message") or {}
        text = "".join(b.get("text", "") for b in message.get("content") or [] if isinstance(b, dict))
        reason = output.get("stopReason")
        usage = output.get("usage") or {}
        counts = (usage.get("inputTokens") or 0, usage.get("outputTokens") or 0)
    else:
        raise ValueError(f"an answer of no known Bedrock model family: {sorted(output)}")
    return chat_completion(
        id=ident, model=model, created=created, content=text, finish_reason=_FINISH.get(str(reason), "stop"),
        prompt_tokens=int(counts[0]), completion_tokens=int(counts[1]),
    )  # fmt: skip
