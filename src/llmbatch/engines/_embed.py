"""Sentence embeddings for /v1/embeddings, batched, from a local sentence-transformers model.

Requests are queued; one thread embeds up to `batch_size` inputs at a time across requests,
so a batch of many small embedding rows runs as a few large forward passes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import queue
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from ._base import EngineResponse, Usage, error_body
from ._packaged import DEFAULT_EMBEDDING_MODEL, INSTALL_EMBEDDINGS, packaged_embedding_model
from ._request import BadRequest, embedding_base64, json_parts, resolve_future, short_gil_turns

__all__ = ["SentenceEmbedder", "resolve_embedding_model"]

_MAX_INPUTS = 2048
# Answers with more floats are shaped and serialised in a worker thread, in parts (`json_parts`),
# so the server's event loop does not hold them (2,048 vectors of 1,024 floats: ~40 MB of JSON).
_INLINE_FLOATS = 65_536


def resolve_embedding_model(value: str | None) -> str | None:
    """The embedding model directory to load: `value`, else the packaged default when installed.

    "none" turns embeddings off. Raises ConfigError when an explicit path does not exist.
    """
    if value is not None and value.lower() == "none":
        return None
    if value is None:
        path = packaged_embedding_model()
        if path is None:
            return None
        if importlib.util.find_spec("sentence_transformers") is None:
            return None
        return str(path)
    if not Path(value).exists():
        raise ConfigError(f"embedding model {value} does not exist (a sentence-transformers model directory)")
    return value


@dataclass(slots=True, eq=False)
class _Job:
    texts: list[str]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop
    vectors: list[list[float]] | None = None
    tokens: int = 0
    error: str | None = None


class SentenceEmbedder:
    """Answers /v1/embeddings bodies with a sentence-transformers model, normalised vectors."""

    def __init__(self, path: str, *, batch_size: int = 64, device: str | None = None) -> None:
        self.path = path
        self.batch_size = batch_size
        self.device = device
        stem = Path(path).name
        if path == str(packaged_embedding_model()):
            names = [DEFAULT_EMBEDDING_MODEL, f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"]
        else:
            names = [stem]
        self.names: tuple[str, ...] = tuple(dict.fromkeys([*names, path]))
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._starting: asyncio.Lock | None = None

    async def start(self) -> None:
        """Loads the model; `handle` calls it on the first request (so chat-only runs never pay for it)."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._thread is not None:
                return
            self._model = await asyncio.to_thread(self._load)
            self._thread = threading.Thread(target=self._main, name="llmbatch-embeddings", daemon=True)
            self._thread.start()

    def _load(self) -> Any:
        try:
            import transformers
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ConfigError(f"embeddings need sentence-transformers: {INSTALL_EMBEDDINGS}") from e
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        return SentenceTransformer(self.path, device=self.device, local_files_only=True)

    async def aclose(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._model = None

    async def handle(self, body: Any) -> EngineResponse:
        try:
            texts, dimensions, as_base64, model = self._parse(body)
        except BadRequest as e:
            return EngineResponse(400, error_body(e.message, "invalid_request_error", param=e.param))
        if self._thread is None:
            try:
                await self.start()
            except Exception as exc:
                return EngineResponse(500, error_body(f"the embedding model failed to load: {exc}", "server_error"))
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop.create_future(), loop)
        self._queue.put(job)
        await job.future
        if job.error is not None or job.vectors is None:
            return EngineResponse(500, error_body(f"embedding failed: {job.error}", "server_error"))
        width = len(job.vectors[0]) if job.vectors else 0
        if dimensions is not None and dimensions > width:
            message = f"Invalid 'dimensions': {model} gives vectors of {width} dimensions; ask for at most {width}."
            return EngineResponse(400, error_body(message, "invalid_request_error", param="dimensions"))
        if len(job.vectors) * width <= _INLINE_FLOATS:
            return _answer(job, dimensions, as_base64, model, in_parts=False)
        with short_gil_turns():
            return await asyncio.to_thread(_answer, job, dimensions, as_base64, model, in_parts=True)

    def _parse(self, body: Any) -> tuple[list[str], int | None, bool, str]:
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.", None)
        model = body.get("model")
        if model not in self.names:
            raise BadRequest(f"unknown embedding model {model!r}: this server serves {self.names[0]!r}", "model")
        raw = body.get("input")
        if type(raw) is str:
            texts = [raw]
        elif isinstance(raw, list) and raw and all(type(t) is str for t in raw):
            texts = raw
        else:
            raise BadRequest("Invalid 'input': expected a string or a non-empty array of strings.", "input")
        if len(texts) > _MAX_INPUTS:
            raise BadRequest(f"Invalid 'input': at most {_MAX_INPUTS} inputs per request.", "input")
        if any(not t for t in texts):
            raise BadRequest("Invalid 'input': inputs must be non-empty strings.", "input")
        dimensions = body.get("dimensions")
        if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
            raise BadRequest("Invalid 'dimensions': expected a positive integer.", "dimensions")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest("Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format")
        return texts, dimensions, fmt == "base64", model

    def _main(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            size = len(job.texts)
            while size < self.batch_size:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
                size += len(more.texts)
            self._embed(jobs)

    def _embed(self, jobs: list[_Job]) -> None:
        texts = [t for job in jobs for t in job.texts]
        try:
            tokenizer = self._model.tokenizer
            limit = self._model.get_max_seq_length() or 512
            counts = [min(len(ids), limit) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
            # show_progress_bar: by default it follows its logger, drawing a tqdm bar into the
            # server's log for every call when the server logs at INFO.
            vectors = self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ).tolist()
        except Exception as exc:  # a failure answers the rows, never kills the thread
            for job in jobs:
                job.error = repr(exc)
                job.loop.call_soon_threadsafe(resolve_future, job.future)
            return
        i = 0
        for job in jobs:
            n = len(job.texts)
            job.vectors = vectors[i : i + n]
            job.tokens = sum(counts[i : i + n])
            i += n
            job.loop.call_soon_threadsafe(resolve_future, job.future)


def _answer(job: _Job, dimensions: int | None, as_base64: bool, model: str, *, in_parts: bool) -> EngineResponse:
    """The answer to a finished job: its vectors cut to `dimensions`, encoded; its JSON in parts
    when `in_parts` (called in a worker thread then)."""
    assert job.vectors is not None
    data = []
    for i, vector in enumerate(job.vectors):
        if dimensions is not None:
            vector = _renormalise(vector[:dimensions])
        encoded: Any = embedding_base64(array("f", vector)) if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    out = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": job.tokens, "total_tokens": job.tokens},
    }
    return EngineResponse(200, json_parts(out) if in_parts else out, Usage(job.tokens, 0, 0, 0))


def _renormalise(vector: list[float]) -> list[float]:
    norm = sum(x * x for x in vector) ** 0.5
    return vector if norm == 0 else [x / norm for x in vector]
