"""The pieces engines share to answer big requests: JSON in parts, short GIL turns."""

from __future__ import annotations

import sys

import orjson

from llmbatch.engines._request import PART_BYTES, json_parts, short_gil_turns


def test_json_parts_concatenate_to_the_body_in_parts_of_about_a_mebibyte() -> None:
    body = {"object": "list", "data": [{"i": i, "v": [0.5] * 1000} for i in range(1500)], "usage": {"n": 1}, "e": []}
    parts = json_parts(body)
    assert b"".join(parts) == orjson.dumps(body)
    assert len(parts) > 2 and all(len(p) < PART_BYTES + 20_000 for p in parts)
    assert json_parts({}) == [b"{}"] and json_parts({"a": []}) == [b'{"a":[]}']


def test_short_gil_turns_restore_the_usual_turn_once_the_last_holder_leaves() -> None:
    usual = sys.getswitchinterval()
    first, second = short_gil_turns(), short_gil_turns()
    first.__enter__()
    second.__enter__()
    assert sys.getswitchinterval() == 0.001
    first.__exit__(None, None, None)  # overlapping holders: the other still needs short turns
    assert sys.getswitchinterval() == 0.001
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == usual
