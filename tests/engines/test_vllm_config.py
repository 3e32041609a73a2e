"""The vllm engine's configuration, checked without vLLM or a GPU: the arguments `vllm.LLM`
gets from the engine options, and the LoRA rank it is given for the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmbatch._exceptions import ConfigError
from llmbatch.engines import VLLMOptions
from llmbatch.engines._vllm import llm_kwargs, lora_rank


def adapter(tmp_path: Path, name: str, r: int, **config: object) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA", **config}))
    return str(path)


def test_lora_rank_is_the_smallest_vllm_accepts_in_every_version(tmp_path: Path) -> None:
    # vLLM before 0.11.2 refuses a max_lora_rank of 1 (it starts at 8); 8 serves rank-1 adapters.
    assert lora_rank({"tiny": adapter(tmp_path, "tiny", 1)}) == 8
    assert lora_rank({"a": adapter(tmp_path, "a", 8), "b": adapter(tmp_path, "b", 12)}) == 16
    assert lora_rank({"p": adapter(tmp_path, "p", 4, rank_pattern={"q_proj": 300})}) == 320
    with pytest.raises(ConfigError, match="above vLLM's largest"):
        lora_rank({"huge": adapter(tmp_path, "huge", 1024)})
    with pytest.raises(ConfigError, match="missing"):
        lora_rank({"gone": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="no valid LoRA rank"):
        lora_rank({"bad": adapter(tmp_path, "bad", 0)})


def test_llm_kwargs(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    base = llm_kwargs(VLLMOptions(model_path=str(model)))
    assert base == {"model": str(model), "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "dtype": "auto"}
    lora = llm_kwargs(
        VLLMOptions(model_path=str(model), adapters={"x": adapter(tmp_path, "x", 16)}, n_ctx=4096, n_parallel=64)
    )
    assert lora["enable_lora"] and lora["max_loras"] == 1 and lora["max_lora_rank"] == 16
    assert (lora["max_model_len"], lora["max_num_seqs"]) == (4096, 64)
    with pytest.raises(ConfigError, match="needs --model-path"):
        llm_kwargs(VLLMOptions())
    with pytest.raises(ConfigError, match="does not exist"):
        llm_kwargs(VLLMOptions(model_path=str(tmp_path / "missing")))
