"""The vllm engine: a Hugging Face model on one or more CUDA GPUs through vLLM, LoRA adapters per row.

vLLM API as read in vllm-project/vllm's sources: the main branch of 2026, with renderer-based
input processing (vllm/entrypoints/llm.py and offline_utils.py, vllm/v1/engine/llm_engine.py,
input_processor.py and output_processor.py, vllm/sampling_params.py, vllm/outputs.py,
vllm/config/lora.py, vllm/lora/request.py), and older releases (V0 and early-V1 LLMEngine,
GuidedDecodingParams) for the fallbacks. Everything used here is what `LLM.generate` itself calls:

- `vllm.LLM(model=..., tensor_parallel_size, gpu_memory_utilization, max_model_len,
  max_num_seqs, dtype, enable_lora, max_loras, max_lora_rank, distributed_executor_backend)`
  (with "ray", vLLM's Ray executor puts its workers in the placement group of the Ray actor that
  builds the LLM: `EngineArgs.create_engine_config` captures `get_current_placement_group()`,
  `initialize_ray_cluster` takes its bundles of one GPU each), `LLM.get_tokenizer()`;
- `LLM.llm_engine` (the v1 `LLMEngine`): `add_request(request_id, prompt, params,
  lora_request=...)`, `step() -> list[RequestOutput]`, `has_unfinished_requests()`,
  `abort_request([request_id])`, `add_lora(LoRARequest)`, `model_config.max_model_len`,
  `vllm_config.scheduler_config.max_num_seqs`;
- prompts as token inputs `{"type": "token", "prompt_token_ids": [...]}`: the `EngineInput`
  that `LLM._add_request` passes on main (where raw prompts are deprecated, "removed in
  v0.18"), and a valid `TokensPrompt` in older releases;
- `SamplingParams(n, temperature, top_p, max_tokens, stop, seed, frequency_penalty,
  presence_penalty, output_kind=RequestOutputKind.FINAL_ONLY, structured_outputs=
  StructuredOutputsParams(json=... | json_object=True))` (`guided_decoding=GuidedDecodingParams`
  in older releases);
- `LoRARequest(lora_name, lora_int_id, lora_path)`; `RequestOutput.request_id / finished /
  prompt_token_ids / outputs`, `CompletionOutput.index / text / token_ids / finish_reason`.

Rows are batched continuously across the server's requests: the worker thread drives vLLM's
own step loop (what `LLM.generate` does inside), adding each queued row as soon as it arrives,
so new rows join while others are generating and the GPU never waits for a whole group to
finish. vLLM schedules up to `max_num_seqs` sequences per step; the server keeps several times
that many rows queued so a finished sequence is replaced at once.

Sampling follows the row's OpenAI parameters only: the sampling defaults in the model's
generation_config.json, which vLLM's own server applies, are not (its EOS ids still stop).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError, EngineError, EngineUnavailable
from ._model import Choice, Generation, ModelEngine, _Item, _Take, hf_prompt_ids, model_names
from ._options import parse_adapters
from ._packaged import INSTALL_VLLM

if TYPE_CHECKING:
    from ._options import VLLMOptions

__all__ = ["VLLMEngine", "llm_kwargs", "lora_rank"]

log = logging.getLogger("llmbatch.engines")

#: The `max_lora_rank` values vLLM accepts (`MaxLoRARanks` in vllm/config/lora.py); 1 only from
#: 0.11.2 on, so it is left out (the rank is a ceiling: 8 serves rank-1 adapters too).
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: Rows taken from the queue at once; all go to vLLM's scheduler, which admits what fits.
_TAKE_LIMIT = 4096
#: Rows the server keeps queued per sequence vLLM runs at once, so a freed slot is refilled at once.
_QUEUE_FACTOR = 4
#: Seconds between looks for rows of cancelled batches, whose requests are then aborted.
_CANCEL_SWEEP_S = 0.25
#: vLLM keeps seeds as int64 (and gives choice i of a request `seed + i`); larger JSON integers
#: are folded into range, leaving room for those increments.
_SEED_RANGE = 2**63


def lora_rank(adapters: dict[str, str]) -> int:
    """The smallest `max_lora_rank` vLLM accepts that fits every adapter's rank (PEFT `r`, `rank_pattern`)."""
    highest = 0
    for name, path in adapters.items():
        config_path = Path(path) / "adapter_config.json"
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"adapter {name!r}: {config_path} is missing (a PEFT LoRA directory)") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"adapter {name!r}: cannot read {config_path}: {e}") from e
        ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
        if not all(type(r) is int and r > 0 for r in ranks):
            raise ConfigError(f"adapter {name!r}: {config_path} has no valid LoRA rank 'r'")
        highest = max(highest, *ranks)
    for allowed in _LORA_RANKS:
        if highest <= allowed:
            return allowed
    raise ConfigError(f"LoRA rank {highest} is above vLLM's largest, {_LORA_RANKS[-1]}")


def llm_kwargs(config: VLLMOptions) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for `config`; the engine and its tests and benchmark share them."""
    path = config.model_path
    if path is None:
        raise ConfigError("the vllm engine needs --model-path: a Hugging Face model directory or model id")
    local = Path(path).expanduser()
    if not local.exists() and (local.is_absolute() or path.startswith((".", "~"))):
        raise ConfigError(f"vllm: model directory {path} does not exist")
    kwargs: dict[str, Any] = {
        "model": str(local) if local.exists() else path,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "dtype": config.dtype or "auto",
    }
    if config.n_ctx is not None:
        kwargs["max_model_len"] = config.n_ctx
    # n_parallel's default (8) suits a CPU; vLLM picks its own (256, or 1024 on 70+ GiB GPUs) unless told.
    if "n_parallel" in config.model_fields_set:
        kwargs["max_num_seqs"] = config.n_parallel
    if config.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = config.distributed_executor_backend
    adapters = parse_adapters(config.adapters)
    if adapters:
        kwargs.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=lora_rank(adapters))
    return kwargs


@dataclass(slots=True, eq=False)
class _Running:
    """A request in vLLM: the queued item, and how many copies of its one greedy answer to return."""

    item: _Item
    copies: int = 1


class VLLMEngine(ModelEngine):
    """Chat and completions on a Hugging Face model through vLLM; rows naming an adapter run on it."""

    name = "vllm"
    supported = frozenset({"response_format"})

    def __init__(self, config: VLLMOptions) -> None:
        # What this machine lacks comes first (EngineUnavailable), then the options: the Ray
        # executor's API process, without vLLM or a GPU, leaves the model files to its replicas.
        if importlib.util.find_spec("vllm") is None:
            raise EngineUnavailable(f"the vllm engine needs vLLM: {INSTALL_VLLM}")
        # With Ray's executor the GPUs are its workers' (in the placement group), not this process's.
        if config.distributed_executor_backend != "ray":
            import torch

            # device_count asks NVML: unlike is_available it leaves CUDA uninitialised, so vLLM may still fork.
            if torch.cuda.device_count() == 0:
                raise EngineUnavailable(
                    "the vllm engine needs a CUDA GPU and none is visible here: "
                    "use --engine transformers or --engine llamacpp on this machine"
                )
        self._kwargs = llm_kwargs(config)  # checks --model-path and the adapters
        super().__init__(config)
        self._names = model_names(config.model_path, config.served_model_name)  # type: ignore[arg-type]
        self.max_concurrency = max(config.max_concurrency, _QUEUE_FACTOR * self._kwargs.get("max_num_seqs", 256))
        self._llm: Any = None
        self._tokenizer: Any = None
        self._lora: dict[str, Any] = {}
        self._max_model_len = 0
        self._ids = itertools.count()

    # -- loading --------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ConfigError(f"the vllm engine could not import vLLM ({e}): {INSTALL_VLLM}") from e
        path = self._kwargs["model"]
        try:
            self._llm = vllm.LLM(**self._kwargs)
        except Exception as e:
            raise EngineError(f"vllm could not load {path}: {e}") from e
        engine = self._llm.llm_engine
        self._tokenizer = self._llm.get_tokenizer()
        self._max_model_len = int(engine.model_config.max_model_len)
        # Loaded now, so a broken adapter fails the start instead of the first row that names it.
        for i, (name, adapter_path) in enumerate(self.adapters.items()):
            request = LoRARequest(name, i + 1, adapter_path)
            try:
                if engine.add_lora(request) is False:
                    raise RuntimeError("vllm refused it")
            except Exception as e:
                self._unload()
                raise EngineError(f"vllm could not load adapter {name!r} from {adapter_path}: {e}") from e
            self._lora[name] = request
        max_num_seqs = int(engine.vllm_config.scheduler_config.max_num_seqs)
        self.max_concurrency = max(self.config.max_concurrency, _QUEUE_FACTOR * max_num_seqs)
        self.base_names = self._names
        log.info(
            "vllm: %s, %d sequences of up to %d tokens, %d adapters",
            path,
            max_num_seqs,
            self._max_model_len,
            len(self._lora),
        )

    def _unload(self) -> None:
        llm, self._llm = self._llm, None
        self._tokenizer = None
        self._lora = {}
        if llm is None:
            return
        # The engine core is a child process by default: shutting it down frees its GPU memory.
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):
                shutdown()
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_initialized():  # the model ran in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            torch.cuda.empty_cache()

    # -- the step loop --------------------------------------------------------------------

    def _run(self, take: _Take) -> None:
        engine = self._llm.llm_engine
        running: dict[str, _Running] = {}
        next_sweep = 0.0
        try:
            while True:
                items = take(_TAKE_LIMIT, not running)  # wait for rows only when nothing is generating
                if self._stopping:
                    for item in items:
                        self._fail(item, "the vllm engine stopped", 503)
                    return
                for item in items:
                    self._submit(engine, item, running)
                now = time.monotonic()
                if now >= next_sweep:  # a sweep looks at every running row: not on every step
                    self._drop_cancelled(engine, running)
                    next_sweep = now + _CANCEL_SWEEP_S
                if running:
                    self._step(engine, running)
        finally:
            for req in running.values():
                self._fail(req.item, "the vllm engine stopped", 503)

    def _step(self, engine: Any, running: dict[str, _Running]) -> None:
        """One vLLM step; finished requests are answered. A failure fails the running rows, never the thread."""
        try:
            if not engine.has_unfinished_requests():  # vLLM dropped them: never wait on them forever
                self._abort_all(engine, running, "vllm lost the request")
                return
            outputs = engine.step()
        except Exception as exc:
            log.exception("vllm: engine step failed")
            self._abort_all(engine, running, f"vllm failed: {exc}")
            return
        for out in outputs:
            req = running.pop(out.request_id, None) if out.finished else None
            if req is None:
                continue
            try:
                self._finish(req, out)
            except Exception as exc:
                log.exception("vllm: unexpected output for %s", out.request_id)
                self._fail(req.item, f"vllm returned an unexpected output: {exc}", 500)

    def _submit(self, engine: Any, item: _Item, running: dict[str, _Running]) -> None:
        """Sends one request to vLLM's scheduler, or fails it with a 400 saying why."""
        gen = item.generation
        try:
            prompt = hf_prompt_ids(self._tokenizer, gen)
        except Exception as exc:
            what = "apply the chat template" if gen.messages is not None else "tokenize the prompt"
            self._fail(item, f"could not {what}: {exc}")
            return
        if not prompt:
            self._fail(item, "The prompt is empty.")
            return
        room = self._max_model_len - len(prompt)
        if room < 1:
            self._fail(
                item,
                f"This model's context is {self._max_model_len} tokens per sequence, "
                f"but the prompt has {len(prompt)} tokens.",
            )
            return
        request_id = f"llmbatch-{next(self._ids)}"
        try:
            params, copies = self._sampling_params(gen, room)
            engine.add_request(
                request_id,
                {"type": "token", "prompt_token_ids": prompt},
                params,
                lora_request=self._lora[gen.adapter] if gen.adapter else None,
            )
        except Exception as exc:
            self._fail(item, f"vllm refused the request: {exc}")
            return
        gen.prompt_tokens = len(prompt)
        running[request_id] = _Running(item, copies)

    def _sampling_params(self, gen: Generation, room: int) -> tuple[Any, int]:
        """vLLM's SamplingParams for `gen`, and how many copies of the answer the row wants."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        # vLLM refuses top_p=0 and n>1 with greedy decoding; both mean one deterministic answer.
        greedy = gen.temperature == 0 or gen.top_p == 0
        max_tokens = room if gen.max_tokens is None else min(gen.max_tokens, room)
        kwargs: dict[str, Any] = {
            "n": 1 if greedy else gen.n,
            "temperature": 0.0 if greedy else gen.temperature,
            "top_p": 1.0 if greedy else gen.top_p,
            "max_tokens": max_tokens,
            "stop": list(gen.stop) or None,
            "seed": None if gen.seed is None else gen.seed % (_SEED_RANGE - gen.n),
            "frequency_penalty": gen.frequency_penalty,
            "presence_penalty": gen.presence_penalty,
            "output_kind": RequestOutputKind.FINAL_ONLY,
        }
        if gen.json_schema is not None:
            kwargs.update(_structured_output(gen.json_schema))
        return SamplingParams(**kwargs), gen.n if greedy else 1

    def _finish(self, req: _Running, out: Any) -> None:
        gen = req.item.generation
        completions = sorted(out.outputs, key=lambda c: c.index)
        # "abort", and from vLLM 0.15 "error": the request did not run to an answer.
        failed = [c.finish_reason for c in completions if c.finish_reason in ("abort", "error")]
        if not completions or failed:
            self._fail(req.item, f"vllm ended the request: {failed[0] if failed else 'no output'}", 500)
            return
        choices = [
            Choice(c.text, "length" if c.finish_reason == "length" else "stop", len(c.token_ids)) for c in completions
        ]
        if req.copies > 1:
            choices = [Choice(choices[0].text, choices[0].finish_reason, choices[0].tokens) for _ in range(req.copies)]
        gen.choices = choices
        if out.prompt_token_ids is not None:
            gen.prompt_tokens = len(out.prompt_token_ids)
        self._done(req.item)

    def _drop_cancelled(self, engine: Any, running: dict[str, _Running]) -> None:
        """Aborts the requests of rows whose batch was cancelled, freeing their sequences."""
        gone = [request_id for request_id, req in running.items() if req.item.cancelled]
        if gone:
            with contextlib.suppress(Exception):
                engine.abort_request(gone)
            for request_id in gone:
                self._done(running.pop(request_id).item)

    def _abort_all(self, engine: Any, running: dict[str, _Running], message: str) -> None:
        with contextlib.suppress(Exception):
            engine.abort_request(list(running))
        for req in running.values():
            self._fail(req.item, message, 500)
        running.clear()


def _structured_output(schema: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keywords constraining the answer to `schema` ({}: any JSON object)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:  # older vLLM named it guided decoding
        from vllm.sampling_params import GuidedDecodingParams

        guided = GuidedDecodingParams(json=schema) if schema else GuidedDecodingParams(json_object=True)
        return {"guided_decoding": guided}
    params = StructuredOutputsParams(json=schema) if schema else StructuredOutputsParams(json_object=True)
    return {"structured_outputs": params}
