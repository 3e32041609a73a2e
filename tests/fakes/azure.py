"""A fake of Azure OpenAI's batch API: the v1 API and the dated one, on one resource.

Built from shared/reference/provider-batch-apis.md section 2 and Azure's batch how-to, over
the OpenAI-style core in `tests/fakes/groq.py`:

- v1 API under `/openai/v1` (key in `api-key` or `Authorization: Bearer`), lines and batches
  naming `/v1/chat/completions`, `/v1/responses` or `/v1/embeddings`;
- dated API under `/openai` (`?api-version=` required, key in `api-key`), lines and batches
  naming `/chat/completions`; the direct API at `/openai/deployments/{name}/chat/completions`;
- each line's `model` must be a deployment (`deployments`), else that request answers 404;
- wire quirks: `"endpoint": null` on batches, `""` for no output or error file, output lines
  without `id`, `request_id` a UUID, `content_filter_results` / `prompt_filter_results` in
  bodies, and the underlying model's name (not the deployment's) in `model`;
- the enqueued-token quota: `reject_creates` answers creates with 400 `token_limit_exceeded`
  (regions with "fail fast"); `token_limit_batches` lets the next batches be created and
  then fail validation with that code (the older behaviour).
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .groq import FakeBatch, FakeBatchAPI, error_response

__all__ = ["FakeAzure"]

_SAFE = {"filtered": False, "severity": "safe"}


class FakeAzure(FakeBatchAPI):
    """An Azure OpenAI resource with batch deployments."""

    v1_endpoints = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/embeddings"})

    def __init__(
        self, *, deployments: set[str] | None = None, underlying_model: str = "gpt-4o-mini-2024-07-18", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        #: The batch deployments of the resource (None: any name is one).
        self.deployments = deployments
        self.underlying_model = underlying_model
        #: How many of the next batches fail validation with `token_limit_exceeded`.
        self.token_limit_batches = 0

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                *self.routes("/openai/v1", "v1"),
                *self.routes("/openai", "dated", chat_path="/openai/deployments/{deployment}/chat/completions"),
            ]
        )

    def refuse(self, request: Request, api: str) -> Response | None:
        if api == "dated":
            if not request.query_params.get("api-version"):
                return error_response(404, "Resource not found", "404")
            ok = request.headers.get("api-key") == self.key
        else:
            ok = self.key in (request.headers.get("api-key"), request.headers.get("authorization", "")[7:])
        if not ok:
            return error_response(401, "Access denied due to invalid subscription key or wrong API endpoint.", "401")
        return None

    def endpoints_for(self, api: str) -> frozenset[str]:
        return self.v1_endpoints if api == "v1" else frozenset(e.removeprefix("/v1") for e in self.v1_endpoints)

    def new_id(self, kind: str) -> str:
        return f"{kind}_{uuid.uuid4()}" if kind == "batch" else f"{kind}-{uuid.uuid4().hex}"

    def batch_object(self, b: FakeBatch) -> dict[str, Any]:
        obj = super().batch_object(b)
        obj["endpoint"] = None
        obj["output_file_id"] = b.output_file_id or ""
        obj["error_file_id"] = b.error_file_id or ""
        return obj

    def no_file(self) -> str | None:
        return ""

    def output_line(self, custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "response": {"body": body, "request_id": str(uuid.uuid4()), "status_code": status},
            "error": None,
        }

    def not_run_line(self, custom_id: str, code: str, message: str) -> dict[str, Any]:
        return {"custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}

    def check_model(self, model: Any) -> tuple[int, dict[str, Any]] | None:
        if self.deployments is None or model in self.deployments:
            return None
        message = f"The API deployment for this resource does not exist: {model!r}."
        return 404, {"error": {"code": "DeploymentNotFound", "message": message}}

    def decorate_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        body["model"] = self.underlying_model
        body["system_fingerprint"] = "fp_fake"
        filters = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
        for choice in body["choices"]:
            choice["content_filter_results"] = filters
        body["prompt_filter_results"] = [
            {
                "prompt_index": 0,
                "content_filter_results": {**filters, "jailbreak": {"filtered": False, "detected": False}},
            }
        ]
        return body

    def validation_errors(self, b: FakeBatch) -> list[dict[str, Any]]:
        if self.token_limit_batches > 0:
            self.token_limit_batches -= 1
            message = (
                "The number of enqueued tokens has surpassed the configured limit for the deployment. "
                "Please either increase the limit or try again once the current jobs have finished."
            )
            return [{"code": "token_limit_exceeded", "message": message, "param": None, "line": None}]
        return super().validation_errors(b)

    async def chat(self, request: Request, api: str) -> Response:
        if api == "dated":  # the deployment is in the path; the body's model is ignored
            body = await request.json()
            deployment = request.path_params["deployment"]
            with self.lock:
                status, answer = self.answer("/chat/completions", {**body, "model": deployment}, None)
            return JSONResponse(answer, status)
        return await super().chat(request, api)
