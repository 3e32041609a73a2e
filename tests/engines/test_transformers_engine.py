"""The transformers engine on the CPU, offline: a tiny random Llama model and a LoRA adapter built in a temp dir.

Answers are compared with transformers' and PEFT's own greedy `generate` on the same model,
one prompt at a time and unpadded, while the engine runs rows together in padded calls, base
and adapter rows mixed. The model's special tokens have zero output rows and the others
large ones, so the greedy answers used here run to max_tokens.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EngineHandle, jsonl, read_jsonl, upload, wait_batch
from llmbatch._exceptions import ConfigError
from llmbatch.engines import TransformersOptions, create_engine

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

# PEFT, building and loading the adapter here, calls a transformers method that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

MODEL = "tiny-llama"  # the model directory's name, so the base model's served name
ADAPTER = "my-adapter"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
N_CTX = 128

# -- the tiny model ---------------------------------------------------------------------------

_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_WORDS = (
    "the a of and to in is it you that was for on are with as they be at one have this from or by word but what "
    "some we can out other all there when up use how said each she which do time if will way about many then them "
    "write like so these long make thing see two has look more day could go come did number sound no most people "
    "over know water than call first who may down side been now find new work part take place made live where after "
    "back little only round man year came show every good give our under name very through just great think say "
    "help low line story dragon knight castle river count apple green blue red seven three nine"
).split()


def _corpus(n: int = 600) -> Iterator[str]:
    rng = random.Random(0)
    for i in range(n):
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        text = text[0].upper() + text[1:] + rng.choice(".!?,:")
        if i % 4 == 0:
            text += " " + " ".join(str(rng.randint(0, 99)) for _ in range(3))
        yield text


def build_tiny_model(root: Path) -> Path:
    """A 2-layer Llama with random weights, and a byte-level BPE tokenizer trained here with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Only the corpus's (ASCII) characters: every answer the model can give is readable text.
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=_SPECIALS))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(root)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=bos,
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"),
        tie_word_embeddings=False,
        initializer_range=0.2,  # large enough that the answer depends on the whole prompt
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # logits of several units: clear winners under greedy decoding
        model.lm_head.weight[[tok.token_to_id(t) for t in _SPECIALS]] = 0.0
    model.save_pretrained(root)
    return root


def build_lora_adapter(root: Path, model_dir: Path) -> Path:
    """A PEFT LoRA adapter on q_proj and v_proj of `model_dir`, random and large enough to change answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_" in name:
                weight.normal_(0.0, 0.5)
    model.save_pretrained(root)
    return root


def write_gguf(model_dir: Path, path: Path) -> Path:
    """`model_dir` (built above) as an f32 GGUF file, written the way llama.cpp's converter writes a Llama."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tok["added_tokens"]}
    heads, kv_heads, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(hidden // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope_theta)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template(_CHAT_TEMPLATE)

    def permute(x: Any, n_head: int) -> Any:  # llama.cpp's rotary layout of q and k, undone by the loader
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    modules = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    top["lm_head.weight"] = "output.weight"
    for key, tensor in load_file(str(model_dir / "model.safetensors")).items():
        x = tensor.float().numpy()
        name = top.get(key)
        if name is None:  # model.layers.N.MODULE.weight
            _, _, layer, rest = key.split(".", 3)
            module = rest.removesuffix(".weight")
            name = f"blk.{layer}.{modules[module]}.weight"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                x = permute(x, heads if module == "self_attn.q_proj" else kv_heads)
        w.add_tensor(name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-transformers")
    model = build_tiny_model(root / MODEL)
    return model, build_lora_adapter(root / "adapter", model)


@pytest.fixture(scope="module")
def engine(tiny: tuple[Path, Path]) -> Iterator[EngineHandle]:
    model, adapter = tiny
    # 4 sequences per call: the mixed tests below need several calls, some shared by rows of different lengths.
    config = TransformersOptions(
        model_path=str(model),
        adapters={ADAPTER: str(adapter)},
        embedding_model="none",
        n_parallel=4,
        n_ctx=N_CTX,
        device="cpu",  # float32 like the reference, on a GPU machine too
    )
    e = EngineHandle("transformers", config)
    yield e
    e.close()


class _Reference:
    """transformers' and PEFT's own greedy decoding, one unpadded prompt at a time."""

    def __init__(self, model_dir: Path, adapter_dir: Path) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        # A second copy: PEFT injects its layers into the model it wraps.
        self.tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()

    def chat_ids(self, text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, adapter: bool = False) -> list[int]:
        """The answer's token ids."""
        model = self.tuned if adapter else self.base
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids) :].tolist()

    def chat(self, text: str, max_new_tokens: int, adapter: bool = False) -> str:
        ids = self.greedy(self.chat_ids(text), max_new_tokens, adapter)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(tiny: tuple[Path, Path]) -> _Reference:
    return _Reference(*tiny)


def chat(text: str, model: str = MODEL, **body: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **body}


def content(response: Any) -> list[str]:
    return [c["message"]["content"] for c in response.body["choices"]]


# -- answers ----------------------------------------------------------------------------------


def test_chat_answer_has_openai_shape_real_usage_and_matches_transformers(
    engine: EngineHandle, reference: _Reference
) -> None:
    text = "Tell me a story about a dragon."
    r = engine.one(chat(text, max_tokens=12, temperature=0))
    assert r.status_code == 200, r.body
    body = r.body
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert choice["message"]["content"] == reference.chat(text, 12) and choice["message"]["content"].strip()
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(reference.chat_ids(text))  # transformers' own chat template and tokenizer
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage["prompt_tokens"], 12)


def test_responses_api_runs_as_its_chat_request(engine: EngineHandle, reference: _Reference) -> None:
    """/v1/responses on a model engine: the translated chat request's answer, in a response object."""
    import openai

    text = "Tell me a story about a dragon."
    r = engine.one({"model": MODEL, "input": text, "max_output_tokens": 12, "temperature": 0}, RESPONSES)
    assert r.status_code == 200, r.body
    response = openai.types.responses.Response.model_validate(r.body)
    assert response.output_text == reference.chat(text, 12)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == len(reference.chat_ids(text)) and response.usage.output_tokens == 12
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(reference.chat_ids(text)), 12)
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]
    same = engine.one({"model": MODEL, "input": items, "max_output_tokens": 12, "temperature": 0}, RESPONSES)
    assert same.body["output"][0]["content"][0]["text"] == response.output_text
    # What the engine cannot honour is a 400 naming the Responses parameter the caller sent.
    fmt = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}
    for body, param in (
        ({"text": fmt}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ):
        bad = engine.one({"model": MODEL, "input": text, **body}, RESPONSES)
        assert (bad.status_code, bad.body["error"]["param"]) == (400, param), bad.body
        assert param.split(".")[0] in bad.body["error"]["message"]


def test_completions_default_to_16_tokens_and_match_transformers(engine: EngineHandle, reference: _Reference) -> None:
    prompt = "The knight and the castle by the river"
    r = engine.one({"model": MODEL, "prompt": prompt, "temperature": 0}, COMPLETIONS)
    assert r.status_code == 200, r.body
    assert r.body["object"] == "text_completion"
    (choice,) = r.body["choices"]
    prompt_ids = reference.tokenizer(prompt)["input_ids"]
    assert prompt_ids[0] == reference.tokenizer.bos_token_id
    expected = reference.tokenizer.decode(reference.greedy(prompt_ids, 16), skip_special_tokens=True)
    assert choice["text"] == expected and choice["finish_reason"] == "length"
    assert r.body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert r.body["usage"]["completion_tokens"] == 16


def test_base_and_adapter_rows_in_flight_together_each_get_their_own_model(
    engine: EngineHandle, reference: _Reference
) -> None:
    texts = ["Write a line about green apples.", "Count seven blue water people.", "Who made the round place?", "Hi"]
    requests = [(CHAT, chat(t, model=m, max_tokens=10, temperature=0)) for t in texts for m in (MODEL, ADAPTER)]
    answers = engine.many(requests)
    assert all(r.status_code == 200 for r in answers), [r.body for r in answers]
    for text, base, tuned in zip(texts, answers[::2], answers[1::2]):
        assert base.body["model"] == MODEL and tuned.body["model"] == ADAPTER
        assert content(base) == [reference.chat(text, 10)]
        assert content(tuned) == [reference.chat(text, 10, adapter=True)]
        assert content(base) != content(tuned)
        assert base.body["usage"]["prompt_tokens"] == tuned.body["usage"]["prompt_tokens"]


def test_max_tokens_is_honoured_per_row_in_one_call(engine: EngineHandle, reference: _Reference) -> None:
    text = "Write a long story about a dragon and a knight."
    full = reference.chat(text, 9)
    for key in ("max_tokens", "max_completion_tokens"):
        short, long = engine.many([(CHAT, chat(text, temperature=0, **{key: n})) for n in (3, 9)])
        assert [r.body["usage"]["completion_tokens"] for r in (short, long)] == [3, 9]
        assert short.body["choices"][0]["finish_reason"] == long.body["choices"][0]["finish_reason"] == "length"
        assert content(long) == [full] and full.startswith(content(short)[0])


def test_stop_string_ends_the_answer(engine: EngineHandle) -> None:
    body = chat("Count from one to twenty.", temperature=0, max_tokens=24)
    (free,) = content(engine.one(body))
    assert len(free) > 10, free
    # A short piece of the free answer, first seen past its start: the stopped answer must end right before it.
    start = next(i for i in range(len(free) // 2, len(free) - 2) if free.find(free[i : i + 2]) > 0)
    stop = free[start : start + 2]
    stopped, unstopped = engine.many([(CHAT, {**body, "stop": ["never there", stop]}), (CHAT, body)])
    (choice,) = stopped.body["choices"]
    assert choice["message"]["content"] == free[: free.find(stop)]
    assert choice["finish_reason"] == "stop"
    assert 0 < stopped.body["usage"]["completion_tokens"] < 24
    assert content(unstopped) == [free] and unstopped.body["usage"]["completion_tokens"] == 24


def test_end_of_sequence_ends_the_answer_without_counting_it(
    engine: EngineHandle, reference: _Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "Name three rivers."
    ids = reference.greedy(reference.chat_ids(text), 8)
    eos = ids[3]
    k = ids.index(eos)  # where the answer now ends: the token's first place
    # Greedy decoding is fixed, so declaring a token it makes the end of sequence ends the answer there.
    monkeypatch.setattr(engine.engine, "_eos", [eos])
    r = engine.one(chat(text, temperature=0, max_tokens=8))
    (choice,) = r.body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == reference.tokenizer.decode(ids[:k], skip_special_tokens=True)
    assert r.body["usage"]["completion_tokens"] == k


def test_fixed_seed_is_deterministic_whatever_else_runs(engine: EngineHandle) -> None:
    body = chat("Tell me a short story.", temperature=1.0, seed=1234, max_tokens=16, n=3)
    a = engine.one(body)
    crowd = engine.many(
        [(CHAT, chat(f"Something about {i}.", temperature=1.0, max_tokens=6)) for i in range(5)] + [(CHAT, body)]
    )
    b = crowd[-1]
    assert a.status_code == b.status_code == 200
    assert content(a) == content(b)
    assert len(set(content(a))) == 3
    assert 16 < a.body["usage"]["completion_tokens"] <= 3 * 16  # every choice counted
    other = engine.one({**body, "seed": 99})
    assert content(other) != content(a)


def test_temperature_zero_is_deterministic_and_n_copies_the_answer(engine: EngineHandle) -> None:
    body = chat("Name two rivers.", temperature=0, max_tokens=6, n=2)
    first, second = engine.one(body), engine.one(body)
    assert content(first) == content(second)
    a, b = content(first)
    assert a == b
    assert first.body["usage"]["completion_tokens"] == 12


def test_more_choices_than_sequences_per_call(engine: EngineHandle) -> None:
    r = engine.one(chat("Tell me a short story.", temperature=1.0, max_tokens=3, n=6))  # n_parallel is 4
    assert r.status_code == 200, r.body
    assert [c["index"] for c in r.body["choices"]] == list(range(6))
    assert 6 < r.body["usage"]["completion_tokens"] <= 18


def test_penalties_change_a_repetitive_answer(engine: EngineHandle) -> None:
    body = chat("Say it again and again.", temperature=0, max_tokens=40)
    plain = engine.one(body)
    tokens = engine.engine._tokenizer.encode(content(plain)[0], add_special_tokens=False)
    assert len(set(tokens)) < len(tokens), "the plain answer repeats no token, so a penalty cannot show"
    for penalty in ("frequency_penalty", "presence_penalty"):
        penalised = engine.one({**body, penalty: 2.0})
        assert penalised.status_code == 200
        assert content(penalised) != content(plain)


# -- errors -----------------------------------------------------------------------------------


def test_unknown_model_is_a_400_naming_it_and_the_served_ones(engine: EngineHandle) -> None:
    r = engine.one(chat("hello", model="no-such-adapter"))
    assert r.status_code == 400
    assert r.body["error"]["param"] == "model"
    message = r.body["error"]["message"]
    assert "no-such-adapter" in message and ADAPTER in message and MODEL in message
    why = engine.engine.validate_model("nope")
    assert why is not None and "nope" in why
    assert engine.engine.validate_model(ADAPTER) is None and engine.engine.validate_model(MODEL) is None


def test_unsupported_parameters_are_a_400_naming_them(engine: EngineHandle) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    for param, value in (("tools", tools), ("response_format", fmt), ("logprobs", True)):
        r = engine.one(chat("hello", **{param: value}))
        assert r.status_code == 400, param
        assert r.body["error"]["param"] == param and param in r.body["error"]["message"]


def test_prompt_longer_than_the_context_is_a_400_and_spares_the_others(engine: EngineHandle) -> None:
    too_long, fine = engine.many(
        [(CHAT, chat(" ".join(["water"] * N_CTX), max_tokens=4)), (CHAT, chat("short", max_tokens=4, temperature=0))]
    )
    assert too_long.status_code == 400
    message = too_long.body["error"]["message"]
    assert "prompt has" in message and f"more than the context of {N_CTX}" in message
    assert fine.status_code == 200 and fine.body["usage"]["completion_tokens"] == 4


def test_a_failing_group_fails_only_its_rows(engine: EngineHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    # The library fails (as on running out of memory) for the call whose prompts mention a dragon.
    model, tokenizer = engine.engine._model, engine.engine._tokenizer
    real = model.generate

    def failing(*args: Any, **kwargs: Any) -> Any:
        if any("dragon" in text for text in tokenizer.batch_decode(kwargs["input_ids"])):
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", failing)
    base, tuned = engine.many(
        [(CHAT, chat("hi", max_tokens=3)), (CHAT, chat("the dragon", model=ADAPTER, max_tokens=3))]
    )
    assert base.status_code == 200
    assert tuned.status_code == 500 and "boom" in tuned.body["error"]["message"]
    monkeypatch.undo()
    assert engine.one(chat("hi", model=ADAPTER, max_tokens=3)).status_code == 200  # the worker thread lives on


def test_models_list_names_the_base_model_and_the_adapter(engine: EngineHandle) -> None:
    models = engine.loop.run_until_complete(engine.engine.list_models())
    assert [m["id"] for m in models] == [MODEL, ADAPTER]
    assert models[1]["parent"] == MODEL


def test_model_without_chat_template_answers_completions_only(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "plain"
    shutil.copytree(tiny[0], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    e = EngineHandle("transformers", TransformersOptions(model_path=str(model), embedding_model="none", device="cpu"))
    try:
        no_chat, completion = e.many(
            [(CHAT, chat("hi", model="plain")), (COMPLETIONS, {"model": "plain", "prompt": "The", "max_tokens": 2})]
        )
    finally:
        e.close()
    assert no_chat.status_code == 400 and "no chat template" in no_chat.body["error"]["message"]
    assert "/v1/completions" in no_chat.body["error"]["message"]
    assert completion.status_code == 200 and completion.body["usage"]["completion_tokens"] == 2


def test_configuration_errors_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--model-path"):
        create_engine("transformers", TransformersOptions(embedding_model="none"))
    with pytest.raises(ConfigError, match="does not exist"):
        create_engine("transformers", TransformersOptions(model_path=str(tmp_path / "missing"), embedding_model="none"))


def test_gguf_file_loads_through_transformers_and_answers_like_the_directory(
    tiny: tuple[Path, Path], reference: _Reference, tmp_path: Path
) -> None:
    pytest.importorskip("gguf")
    path = write_gguf(tiny[0], tmp_path / "tiny.gguf")
    e = EngineHandle("transformers", TransformersOptions(model_path=str(path), embedding_model="none", device="cpu"))
    try:
        assert e.engine.validate_model("tiny") is None  # the file's name without .gguf
        text = "Tell me about the dragon."
        r = e.one(chat(text, model="tiny", max_tokens=8, temperature=0))
    finally:
        e.close()
    assert r.status_code == 200, r.body
    assert content(r) == [reference.chat(text, 8)]
    assert r.body["usage"]["prompt_tokens"] == len(reference.chat_ids(text))


# -- the server -------------------------------------------------------------------------------


def test_batches_through_the_server_with_an_adapter(
    server_factory, tiny: tuple[Path, Path], reference: _Reference
) -> None:  # type: ignore[no-untyped-def]
    model, adapter = tiny
    srv = server_factory(
        "--engine", "transformers", "--model-path", str(model), "--adapter", f"{ADAPTER}={adapter}",
        "--embedding-model", "none", "--device", "cpu",
        start=False,
    )  # fmt: skip
    srv.start(timeout=120)  # importing torch and transformers takes a while on a small machine
    client = srv.client(timeout=60)
    assert {MODEL, ADAPTER} <= {m.id for m in client.models.list()}
    texts = ["Tell me about the dragon.", "Green apples by the river.", "Count to nine.", "Who came back?"]

    def row(i: int, model_name: str, text: str) -> dict[str, Any]:
        body = chat(text, model=model_name, max_tokens=8, temperature=0)
        return {"custom_id": f"{model_name}-{i}", "method": "POST", "url": CHAT, "body": body}

    # A row naming an unknown adapter fails the whole batch at validation, naming its line.
    rows = [row(0, MODEL, texts[0]), row(1, ADAPTER, texts[1]), row(2, "no-such-adapter", texts[2])]
    bad = client.batches.create(input_file_id=upload(client, jsonl(rows)).id, endpoint=CHAT, completion_window="24h")
    failed = wait_batch(client, bad.id, timeout=60)
    assert failed.status == "failed" and failed.errors is not None
    errors = failed.errors.data
    assert [(e.line, e.code) for e in errors] == [(3, "model_not_found")], errors
    assert "no-such-adapter" in (errors[0].message or "") and ADAPTER in (errors[0].message or "")
    assert failed.output_file_id is None

    # One batch mixes base and adapter rows (a base model and its adapters are one family); each
    # row is answered by the model it names.
    rows = [row(i, name, t) for i, t in enumerate(texts) for name in (MODEL, ADAPTER)]
    b = client.batches.create(input_file_id=upload(client, jsonl(rows)).id, endpoint=CHAT, completion_window="24h")
    done = wait_batch(client, b.id, timeout=120)
    assert done.status == "completed", done
    assert done.request_counts.completed == len(rows) and done.request_counts.failed == 0
    lines = {line["custom_id"]: line for line in read_jsonl(client, done.output_file_id)}
    assert set(lines) == {r["custom_id"] for r in rows}
    for name in (MODEL, ADAPTER):
        for i, text in enumerate(texts):
            resp = lines[f"{name}-{i}"]["response"]
            assert resp["status_code"] == 200 and resp["body"]["model"] == name
            assert resp["body"]["usage"]["completion_tokens"] == 8
            assert resp["body"]["usage"]["prompt_tokens"] == len(reference.chat_ids(text))
            expected = reference.chat(text, 8, adapter=name == ADAPTER)
            assert resp["body"]["choices"][0]["message"]["content"] == expected

    direct = client.chat.completions.create(**chat(texts[0], model=ADAPTER, max_tokens=8, temperature=0))
    assert direct.model == ADAPTER and direct.choices[0].message.content == reference.chat(texts[0], 8, adapter=True)


def test_llmbatch_run_on_the_local_transformers_engine_with_an_adapter(
    tiny: tuple[Path, Path], reference: _Reference, tmp_path: Path
) -> None:
    """`llmbatch run --engine transformers --model-path --adapter`: the engine options reach the in-process
    server, rows naming the adapter run on it, and a row naming an unknown adapter is refused at ingest."""
    model, adapter = tiny
    texts = ["Tell me about the dragon.", "Count to nine.", "Who came back?"]
    rows = [
        {
            "custom_id": f"{name}-{i}",
            "method": "POST",
            "url": CHAT,
            "body": chat(t, model=name, max_tokens=6, temperature=0),
        }
        for i, t in enumerate(texts)
        for name in (MODEL, ADAPTER)
    ]
    inp = tmp_path / "rows.jsonl"
    inp.write_bytes(jsonl(rows))
    env = {**os.environ, "LLMBATCH_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "llmbatch", "run", str(inp), "--engine", "transformers", "--model-path", str(model),
           "--adapter", f"{ADAPTER}={adapter}", "--device", "cpu", "--embedding-model", "none",
           "--poll-interval", "0.1"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in (tmp_path / "rows.results.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]
    for o, r in zip(out, rows):
        name = r["body"]["model"]
        expected = reference.chat(r["body"]["messages"][0]["content"], 6, adapter=name == ADAPTER)
        assert o["response"]["body"]["choices"][0]["message"]["content"] == expected

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([{**rows[0], "body": {**rows[0]["body"], "model": "no-such-adapter"}}]))
    refused = subprocess.run([*cmd[:4], str(bad), *cmd[5:]], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert f"{bad}:1: unknown_model" in refused.stderr and "no-such-adapter" in refused.stderr
