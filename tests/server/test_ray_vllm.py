"""vLLM on the Ray executor, on real GPUs: `llmbatch serve --executor ray --engine vllm` runs a
batch of base-model and LoRA-adapter rows on a vLLM replica (a Ray actor with its GPU, or with a
placement group of two for tensor parallelism), and its answers equal the local executor's.

The tiny model and adapter are built by the vllm engine's own tests (`build_tiny_model`,
`build_lora_adapter`); greedy decoding. Ray runs in the server's process, bound to 127.0.0.1.
Skipped without Ray, vLLM or a CUDA GPU; the tensor-parallel test without two GPUs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProc, chat_line, read_jsonl, run_batch

pytestmark = pytest.mark.gpu

pytest.importorskip("ray")
pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
if torch.cuda.device_count() == 0:  # NVML: CUDA stays uninitialised in this process
    pytest.skip("vLLM on Ray needs a CUDA GPU", allow_module_level=True)

from tests.engines.test_vllm_engine import build_lora_adapter, build_tiny_model  # noqa: E402

MODEL = "tiny-llama"
ADAPTER = "tiny-lora"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
OFFLINE_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-ray-vllm")
    model = build_tiny_model(root / "model")
    return model, build_lora_adapter(root / "adapter", model)


@pytest.fixture
def ray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's Ray (started in its process) on 127.0.0.1, its temp dir short, nothing phoned home."""
    temp_dir = Path(tempfile.mkdtemp(prefix="lbrv-", dir="/tmp"))
    (temp_dir / "ray").mkdir()
    for key, value in {**RAY_ENV, **OFFLINE_ENV, "RAY_TMPDIR": str(temp_dir)}.items():
        monkeypatch.setenv(key, value)
    src = str(Path(__file__).resolve().parents[2] / "src")  # replicas import this checkout's llmbatch
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))


def engine_args(tiny: tuple[Path, Path], share: float) -> list[str]:
    model, adapter = tiny
    return [
        "--engine", "vllm", "--model-path", str(model), "--served-model-name", MODEL,
        "--adapter", f"{ADAPTER}={adapter}", "--embedding-model", "none", "--n-ctx", "256",
        "--n-parallel", "16", "--dtype", "bfloat16", "--gpu-memory-utilization", str(share),
    ]  # fmt: skip


def rows() -> list[dict[str, Any]]:
    texts = [f"Tell me about the {w} by the river." for w in ("dragon", "knight", "castle", "apple", "man", "water")]
    return [
        chat_line(f"{model}-{i}", text, model=model, max_tokens=8, temperature=0)
        for model in (MODEL, ADAPTER)
        for i, text in enumerate(texts)
    ]


def answers(srv: ServerProc) -> dict[str, str]:
    """custom_id -> the answer's text, after checking the batch completed every row."""
    client = srv.client(timeout=300)
    done = run_batch(client, rows())
    assert done.status == "completed" and done.request_counts.failed == 0, done
    out = {}
    for line in read_jsonl(client, done.output_file_id):
        body = line["response"]["body"]
        assert body["usage"]["completion_tokens"] == 8
        out[line["custom_id"]] = body["choices"][0]["message"]["content"]
    assert len(out) == len(rows())
    return out


def local_then_ray(
    server_factory: Callable[..., ServerProc], tiny: tuple[Path, Path], *extra: str
) -> tuple[dict[str, str], dict[str, str], ServerProc]:
    """The same batch through the local executor and then the Ray executor (one at a time on the GPU)."""
    local = server_factory(*engine_args(tiny, 0.3), *extra, start=False)
    local.start(timeout=900)  # vLLM compiles and captures CUDA graphs at start
    expected = answers(local)
    local.stop()
    ray_srv = server_factory(
        *engine_args(tiny, 0.3), *extra, "--executor", "ray", "--replicas", "1", "--replica-placement-wait", "900",
        start=False,
    )  # fmt: skip
    ray_srv.start(timeout=900)
    health = httpx.get(f"http://127.0.0.1:{ray_srv.port}/health", timeout=10).json()
    assert health["executor"] == "ray" and health["replicas_alive"] == 1, health
    return expected, answers(ray_srv), ray_srv


@pytest.mark.usefixtures("ray_env")
def test_base_and_adapter_rows_on_a_ray_replica_equal_the_local_executors(
    server_factory: Callable[..., ServerProc], tiny: tuple[Path, Path]
) -> None:
    expected, got, srv = local_then_ray(server_factory, tiny)
    assert got == expected
    assert any(got[f"{MODEL}-{i}"] != got[f"{ADAPTER}-{i}"] for i in range(6))  # the adapter rows ran on it
    assert {MODEL, ADAPTER} <= {m.id for m in srv.client().models.list()}


@pytest.mark.usefixtures("ray_env")
def test_tensor_parallel_replica_in_its_placement_group(
    server_factory: Callable[..., ServerProc], tiny: tuple[Path, Path]
) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism needs 2 GPUs")
    # The tiny model has 2 attention heads and 1 KV head: vLLM splits it over 2 GPUs (the KV head
    # replicated). Both sides split it: locally in vLLM's own processes, on Ray in the replica's group.
    expected, got, _ = local_then_ray(server_factory, tiny, "--tensor-parallel-size", "2")
    assert got == expected
