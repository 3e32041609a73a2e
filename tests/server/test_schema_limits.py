"""Absurd structured-output schemas are the caller's 400, naming the keyword's path, not a 500."""

from __future__ import annotations

from typing import Any

import pytest


def chat(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }


@pytest.mark.parametrize("min_items", [10**12, "many", -1, True])
def test_absurd_min_items_is_a_400_naming_the_path(server, min_items: Any) -> None:  # type: ignore[no-untyped-def]
    schema = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": min_items}},
    }
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat(schema), timeout=20)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "response_format.json_schema.schema.properties.items.minItems"


def test_reasonable_schema_still_answers(server) -> None:  # type: ignore[no-untyped-def]
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 3}}}
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat(schema))
    assert r.status_code == 200


def test_more_enum_values_than_openai_allows_is_a_400(server) -> None:  # type: ignore[no-untyped-def]
    """OpenAI's structured outputs take at most 1,000 enum values in all; so does this server."""
    schema = {
        "type": "object",
        "properties": {"a": {"enum": [f"a{i}" for i in range(600)]}, "b": {"enum": [f"b{i}" for i in range(401)]}},
    }
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat(schema))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith("response_format.json_schema.schema.properties.")
        assert "1000 enum values" in r.json()["error"]["message"]
        schema["properties"]["b"]["enum"] = [f"b{i}" for i in range(400)]
        assert http.post("/v1/chat/completions", json=chat(schema)).status_code == 200
