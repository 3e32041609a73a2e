"""The vllm engine on a CUDA GPU, offline: a tiny random Llama model and a LoRA adapter built in a temp dir.

The model's special tokens can never win (their output rows are zero, every other logit is
large), so answers always run to max_tokens. Answers are compared with vLLM's own
`LLM.chat` / `LLM.generate` on the same settings (`llm_kwargs`), one request at a time on
both sides so that both run the same kernels on the same batch shapes.

Skipped without vLLM or a CUDA GPU. Three vLLM instances share the GPU (the engine under
test, the reference and the server's), each with a fifth of its memory.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EngineHandle, jsonl, read_jsonl, upload, wait_batch
from llmbatch.engines import VLLMOptions
from llmbatch.engines._vllm import llm_kwargs

pytestmark = pytest.mark.gpu

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
# device_count asks NVML; is_available would initialise CUDA here and stop vLLM from forking its workers.
if torch.cuda.device_count() == 0:
    pytest.skip("the vllm engine needs a CUDA GPU", allow_module_level=True)
# No test talks to the internet: vLLM's usage statistics stay off, here and in the server started below.
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "tiny-llama"
ADAPTER = "tiny-lora"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
N_CTX = 256
GPU_SHARE = 0.2

# -- the tiny model ---------------------------------------------------------------------------

_SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_WORDS = (
    "the a of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "story dragon knight castle river count apple green blue red seven three nine"
).split()


def _corpus(n: int = 3000) -> Iterator[str]:
    """English-like sentences with numbers and small JSON objects, so JSON output has tokens to use."""
    rng = random.Random(0)
    for i in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        text = text[0].upper() + text[1:] + rng.choice(".!?,;:")
        if i % 5 == 0:
            text += " " + ", ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 6)))
        if i % 7 == 0:
            text += ' {"a": ' + rng.choice(["true", "false"]) + ', "n": ' + str(rng.randint(0, 9)) + "}"
        yield text


def build_tiny_model(root: Path) -> Path:
    """A 2-layer Llama with random weights and a byte-level BPE tokenizer trained here, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=_SPECIALS, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    # Written by hand so that transformers 4 and 5 both read it.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "model_max_length": 2048,
        "chat_template": _CHAT_TEMPLATE,
    }
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=False,
        initializer_range=0.1,  # large enough that the answer depends on the whole prompt
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.35)  # logits of a few units: clear winners under greedy decoding
        model.lm_head.weight[[tok.token_to_id(t) for t in _SPECIALS]] = 0.0
    model.save_pretrained(root, safe_serialization=True)
    return root


def build_lora_adapter(root: Path, model_dir: Path, rank: int = 8) -> Path:
    """A PEFT LoRA adapter on every projection of `model_dir`, random and large enough to change answers."""
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {  # module: (in_features, out_features)
        "self_attn.q_proj": (hidden, q),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (q, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.3
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(m.split(".")[1] for m in shapes),
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (root / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1))
    return root


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-vllm")
    model = build_tiny_model(root / "model")
    return model, build_lora_adapter(root / "adapter", model)


@pytest.fixture(scope="module")
def config(tiny: tuple[Path, Path]) -> VLLMOptions:
    model, adapter = tiny
    return VLLMOptions(
        model_path=str(model),
        served_model_name=MODEL,
        adapters={ADAPTER: str(adapter)},
        embedding_model="none",
        n_parallel=16,
        n_ctx=N_CTX,
        dtype="bfloat16",
        gpu_memory_utilization=GPU_SHARE,
    )


@pytest.fixture(scope="module")
def engine(config: VLLMOptions) -> Iterator[EngineHandle]:
    e = EngineHandle("vllm", config)
    yield e
    e.close()


class _Reference:
    """vLLM's own offline API on the engine's settings: what the engine's answers must equal."""

    def __init__(self, config: VLLMOptions, adapter: Path) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.llm = LLM(**llm_kwargs(config))
        self.lora = LoRARequest(ADAPTER, 1, str(adapter))

    def chat(self, text: str, adapter: bool = False, **params: Any) -> Any:
        from vllm import SamplingParams

        messages = [{"role": "user", "content": text}]
        lora = self.lora if adapter else None
        return self.llm.chat(messages, SamplingParams(**params), use_tqdm=False, lora_request=lora)[0]

    def complete(self, prompt: str, **params: Any) -> Any:
        from vllm import SamplingParams

        return self.llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]

    def close(self) -> None:
        shutdown = getattr(getattr(self.llm.llm_engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm


@pytest.fixture(scope="module")
def reference(config: VLLMOptions, tiny: tuple[Path, Path], engine: EngineHandle) -> Iterator[_Reference]:
    # Depends on `engine` so the two never profile GPU memory at the same time.
    ref = _Reference(config, tiny[1])
    yield ref
    ref.close()


def chat(text: str, model: str = MODEL, **body: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **body}


def content(response: Any) -> list[str]:
    return [c["message"]["content"] for c in response.body["choices"]]


# -- the engine -------------------------------------------------------------------------------


def test_chat_answer_has_openai_shape_and_matches_vllm(engine: EngineHandle, reference: _Reference) -> None:
    r = engine.one(chat("Tell me a story about a dragon.", max_tokens=12, temperature=0))
    assert r.status_code == 200, r.body
    body = r.body
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    ref = reference.chat("Tell me a story about a dragon.", max_tokens=12, temperature=0)
    assert choice["message"]["content"] == ref.outputs[0].text and ref.outputs[0].text.strip()
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(ref.prompt_token_ids)  # vLLM's own chat template and tokenizer
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage["prompt_tokens"], 12)


def test_completions_default_to_16_tokens_and_match_vllm(engine: EngineHandle, reference: _Reference) -> None:
    prompt = "The knight and the castle by the river"
    r = engine.one({"model": MODEL, "prompt": prompt, "temperature": 0}, COMPLETIONS)
    assert r.status_code == 200, r.body
    assert r.body["object"] == "text_completion"
    (choice,) = r.body["choices"]
    ref = reference.complete(prompt, max_tokens=16, temperature=0)
    assert choice["text"] == ref.outputs[0].text and choice["finish_reason"] == "length"
    assert r.body["usage"]["prompt_tokens"] == len(ref.prompt_token_ids)
    assert r.body["usage"]["completion_tokens"] == 16


def test_adapter_rows_differ_from_base_rows_and_match_vllm_with_the_lora(
    engine: EngineHandle, reference: _Reference
) -> None:
    for text in ("Write a line about green apples.", "Count seven blue water people.", "Who made the round place?"):
        base = engine.one(chat(text, max_tokens=16, temperature=0))
        tuned = engine.one(chat(text, model=ADAPTER, max_tokens=16, temperature=0))
        assert base.status_code == tuned.status_code == 200
        assert tuned.body["model"] == ADAPTER
        assert content(base) == [reference.chat(text, max_tokens=16, temperature=0).outputs[0].text]
        assert content(tuned) == [reference.chat(text, adapter=True, max_tokens=16, temperature=0).outputs[0].text]
        assert content(base) != content(tuned)
        assert base.body["usage"]["prompt_tokens"] == tuned.body["usage"]["prompt_tokens"]


def test_base_and_adapter_rows_run_together(engine: EngineHandle) -> None:
    texts = [f"Say something about number {i}." for i in range(12)]
    requests = [(CHAT, chat(t, model=m, max_tokens=8, temperature=0)) for t in texts for m in (MODEL, ADAPTER)]
    together = engine.many(requests)
    assert all(r.status_code == 200 for r in together)
    assert all(r.body["usage"]["completion_tokens"] == 8 for r in together)
    for base, tuned in zip(together[::2], together[1::2]):
        assert tuned.body["model"] == ADAPTER and content(base) != content(tuned)


def test_max_tokens_cuts_with_length(engine: EngineHandle) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        r = engine.one(chat("Write a long story about a dragon and a knight.", temperature=0, **{key: 5}))
        assert r.body["usage"]["completion_tokens"] == 5
        assert r.body["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer(engine: EngineHandle) -> None:
    body = chat("Count from one to twenty.", temperature=0, max_tokens=24)
    (free,) = content(engine.one(body))
    assert len(free) > 10, free
    # A short piece from the free answer's first half, first seen past its start: the answer must end right before it.
    start = next(i for i in range(len(free) // 4, len(free) // 2) if free.find(free[i : i + 2]) > 0)
    stop = free[start : start + 2]
    r = engine.one({**body, "stop": [stop]})
    (choice,) = r.body["choices"]
    assert choice["message"]["content"] == free[: free.find(stop)]
    assert choice["finish_reason"] == "stop"
    assert r.body["usage"]["completion_tokens"] < 24


def test_fixed_seed_is_deterministic_and_n_gives_distinct_choices(engine: EngineHandle, reference: _Reference) -> None:
    body = chat("Tell me a short story.", temperature=1.0, seed=1234, max_tokens=16, n=3)
    a, b = engine.one(body), engine.one(body)
    assert content(a) == content(b)
    assert len(set(content(a))) == 3
    assert a.body["usage"]["completion_tokens"] == 3 * 16
    ref = reference.chat("Tell me a short story.", temperature=1.0, seed=1234, max_tokens=16, n=3)
    assert sorted(content(a)) == sorted(o.text for o in ref.outputs)
    other = engine.one({**body, "seed": 99})
    assert content(other) != content(a)


def test_greedy_with_n_returns_n_equal_choices(engine: EngineHandle) -> None:
    r = engine.one(chat("Name two rivers.", temperature=0, max_tokens=6, n=2))
    assert r.status_code == 200, r.body
    first, second = content(r)
    assert first == second
    assert r.body["usage"]["completion_tokens"] == 12


def test_json_schema_answer_follows_the_schema(engine: EngineHandle) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}}
    r = engine.one(chat("Is the river blue?", temperature=0, max_tokens=512, response_format=fmt))
    assert r.status_code == 200, r.body
    (choice,) = r.body["choices"]
    content = choice["message"]["content"]
    if choice["finish_reason"] == "length":
        # vLLM's JSON grammar allows any whitespace, which a random tiny model may emit until the
        # limit: what it wrote is still the start of an object.
        assert content.strip().startswith("{"), choice
        return
    assert choice["finish_reason"] == "stop", choice
    answer = json.loads(content)
    assert set(answer) == {"a"} and isinstance(answer["a"], bool)


def test_unknown_adapter_is_a_400_naming_the_served_ones(engine: EngineHandle) -> None:
    r = engine.one(chat("hello", model="no-such-adapter"))
    assert r.status_code == 400
    assert r.body["error"]["param"] == "model"
    assert ADAPTER in r.body["error"]["message"] and MODEL in r.body["error"]["message"]


def test_prompt_longer_than_the_context_is_a_400_and_spares_the_others(engine: EngineHandle) -> None:
    long_text = " ".join(["water"] * (2 * N_CTX))
    too_long, fine = engine.many(
        [(CHAT, chat(long_text, max_tokens=4)), (CHAT, chat("short", max_tokens=4, temperature=0))]
    )
    assert too_long.status_code == 400
    assert f"context is {N_CTX} tokens" in too_long.body["error"]["message"]
    assert fine.status_code == 200 and fine.body["usage"]["completion_tokens"] == 4


def test_models_list_names_the_base_model_and_the_adapter(engine: EngineHandle) -> None:
    models = engine.loop.run_until_complete(engine.engine.list_models())
    ids = [m["id"] for m in models]
    assert ids == [MODEL, ADAPTER]
    assert models[1]["parent"] == MODEL


# -- the server -------------------------------------------------------------------------------


def test_batches_through_the_server_with_an_adapter(server_factory, tiny: tuple[Path, Path]) -> None:  # type: ignore[no-untyped-def]
    model, adapter = tiny
    srv = server_factory(
        "--engine", "vllm", "--model-path", str(model), "--served-model-name", MODEL,
        "--adapter", f"{ADAPTER}={adapter}", "--embedding-model", "none",
        "--n-ctx", str(N_CTX), "--n-parallel", "16", "--dtype", "bfloat16",
        "--gpu-memory-utilization", str(GPU_SHARE),
        start=False,
    )  # fmt: skip
    srv.start(timeout=900)  # vLLM compiles and captures CUDA graphs at start
    client = srv.client(timeout=300)
    assert {MODEL, ADAPTER} <= {m.id for m in client.models.list()}

    texts = [f"Tell me about the {w} by the river." for w in ("dragon", "knight", "castle", "apple", "man", "water")]

    def rows(model_name: str) -> bytes:
        return jsonl(
            [
                {
                    "custom_id": f"{model_name}-{i}",
                    "method": "POST",
                    "url": CHAT,
                    "body": chat(text, model=model_name, max_tokens=8, temperature=0),
                }
                for i, text in enumerate(texts * 2)
            ]
        )

    # A base batch and an adapter batch run at once, so base and adapter rows share steps.
    created = [
        client.batches.create(input_file_id=upload(client, rows(m)).id, endpoint=CHAT, completion_window="24h")
        for m in (MODEL, ADAPTER)
    ]
    answers: dict[str, list[str]] = {}
    for b in created:
        done = wait_batch(client, b.id, timeout=300)
        assert done.status == "completed", done
        assert done.request_counts.completed == len(texts) * 2 and done.request_counts.failed == 0
        lines = sorted(read_jsonl(client, done.output_file_id), key=lambda line: int(line["custom_id"].split("-")[-1]))
        for line in lines:
            resp = line["response"]
            assert resp["status_code"] == 200
            assert resp["body"]["usage"]["completion_tokens"] == 8 and resp["body"]["usage"]["prompt_tokens"] > 0
            assert resp["body"]["choices"][0]["finish_reason"] == "length"
        answers[done.id] = [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines]
    base, tuned = (answers[b.id] for b in created)
    assert all(x != y for x, y in zip(base, tuned))

    direct = client.chat.completions.create(**chat("Hello there.", model=ADAPTER, max_tokens=3, temperature=0))
    assert direct.model == ADAPTER and direct.usage is not None and direct.usage.completion_tokens == 3

    bad = client.batches.create(
        input_file_id=upload(client, rows("no-such-adapter")).id, endpoint=CHAT, completion_window="24h"
    )
    failed = wait_batch(client, bad.id, timeout=60)
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data[0].code == "model_not_found"
