"""The transformers engine: any Hugging Face causal LM (or GGUF file) in-process, with LoRA adapters per row.

It runs on whatever torch runs on (CPU, CUDA, MPS), so it is the engine for models that
llama.cpp cannot load and for machines without vLLM. It batches statically: the worker
takes the queued rows, groups those that can share one `model.generate` call (same
adapter and same sampling settings), and runs each group in padded calls of at most
`n_parallel` sequences. Rows naming a LoRA adapter (`--adapter NAME=PATH`, PEFT format)
run with that adapter switched on and base-model rows with adapters switched off, so base
and adapter rows are served together from one copy of the weights.

Sampling follows OpenAI's parameters only: the model's own `generation_config.json`
defaults (top_k, repetition penalty, ...) are dropped at load. What `generate` does not
offer per sequence is done here: each sequence has its own token limit and stop strings
(a stopping criterion), and frequency / presence penalties are OpenAI's additive ones (a
logits processor). A request with a `seed` runs in a call of its own, so its answer does
not depend on the rows it was queued with.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import itertools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError, EngineError
from ._model import Choice, ModelEngine, _Item, _Take, cut_at_stop, hf_prompt_ids, model_names
from ._packaged import INSTALL_TRANSFORMERS

if TYPE_CHECKING:
    from ._options import TransformersOptions

__all__ = ["TransformersEngine"]

log = logging.getLogger("llmbatch.engines")

_NEEDS_MODEL = "the transformers engine needs --model-path (a Hugging Face model directory or GGUF file)"
#: Context per sequence when neither --n-ctx nor the model's config gives one.
_FALLBACK_CTX = 2048
#: Rows taken from the queue at once, per sequence generated together.
_TAKE_FACTOR = 4
#: torch.manual_seed takes seeds below 2**64; larger JSON integers are folded into range.
_SEED_RANGE = 2**64
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


@dataclass(slots=True, eq=False)
class _Row:
    """A request ready to run: its prompt's token ids and how many tokens its answer may have."""

    item: _Item
    ids: list[int]
    limit: int


@dataclass(slots=True, eq=False)
class _Seq:
    """One sequence of a `generate` call: a choice of a row."""

    row: _Row
    #: Generated tokens when the sequence was stopped by its limit or a stop string; -1 while running.
    done_at: int = -1
    choice: Choice | None = None


@dataclass(slots=True, eq=False)
class _Group:
    """Rows that can share `generate` calls: one adapter, one set of sampling settings."""

    adapter: str | None
    greedy: bool
    temperature: float
    top_p: float
    frequency_penalty: float
    presence_penalty: float
    seed: int | None
    rows: list[_Row] = field(default_factory=list)


class TransformersEngine(ModelEngine):
    """Chat and completions on a Hugging Face model through `transformers`; rows naming an adapter run on it."""

    name = "transformers"
    supported = frozenset()

    def __init__(self, config: TransformersOptions) -> None:
        _check_installed(bool(config.adapters))
        if config.model_path is None:
            raise ConfigError(_NEEDS_MODEL)
        if not Path(config.model_path).expanduser().exists():
            raise ConfigError(
                f"transformers: model {config.model_path} does not exist (a Hugging Face model directory or GGUF file)"
            )
        super().__init__(config)
        self.n_parallel = config.n_parallel
        # Enough rows queued that the next generate call is full.
        self.max_concurrency = max(config.max_concurrency, _TAKE_FACTOR * config.n_parallel)
        self.n_ctx = 0
        self.device = ""
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos: list[int] = []
        self._pad = 0

    # -- loading --------------------------------------------------------------------------

    def _load(self) -> None:
        config = self.config
        if config.model_path is None:
            raise ConfigError(_NEEDS_MODEL)
        _check_installed(bool(self.adapters))
        try:
            import torch
            import transformers
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        except ImportError as e:
            raise ConfigError(
                f"the transformers engine could not import its libraries ({e}): {INSTALL_TRANSFORMERS}"
            ) from e
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

        path = Path(config.model_path).expanduser()
        where: dict[str, Any] = {"local_files_only": True}
        if path.suffix.lower() == ".gguf":  # transformers dequantises GGUF weights into a regular model
            source, where["gguf_file"] = str(path.parent), path.name
        else:
            source = str(path)
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model_config = AutoConfig.from_pretrained(source, **where)
            tokenizer = AutoTokenizer.from_pretrained(source, **where)
            dtype = _dtype(torch, config.dtype, self.device, model_config)
            # transformers 4.56 renamed torch_dtype to dtype; older versions ignore an unknown `dtype`.
            dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
            with _quiet_gguf_loader() if "gguf_file" in where else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_pretrained(
                    source, device_map=self.device, **{dtype_key: dtype}, **where
                )
        except ImportError as e:  # e.g. the gguf package, which transformers needs for GGUF files
            raise ConfigError(f"transformers could not load {config.model_path}: {e}: {INSTALL_TRANSFORMERS}") from e
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise EngineError(f"transformers could not load {config.model_path}: {e}") from e
        model.eval()

        # Generation follows the request's parameters only: keep the model's special tokens, drop its
        # sampling defaults (top_k, repetition_penalty, ...), which OpenAI's API has no way to turn off.
        own = model.generation_config
        eos = [
            *_ids(own.eos_token_id),
            *_ids(getattr(model_config, "eos_token_id", None)),
            *_ids(tokenizer.eos_token_id),
        ]
        self._eos = list(dict.fromkeys(eos))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = own.pad_token_id if own.pad_token_id is not None else (self._eos[0] if self._eos else 0)
            if tokenizer.eos_token is not None and tokenizer.eos_token_id == pad:
                tokenizer.pad_token = tokenizer.eos_token
        self._pad = int(pad)
        tokenizer.padding_side = "left"
        model.generation_config = GenerationConfig(
            bos_token_id=own.bos_token_id, eos_token_id=self._eos or None, pad_token_id=self._pad
        )

        text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        self.n_ctx = config.n_ctx or getattr(text_config, "max_position_embeddings", None) or _FALLBACK_CTX

        model = self._load_adapters(model)
        self._model = model
        self._tokenizer = tokenizer
        self.base_names = model_names(config.model_path, config.served_model_name)
        log.info(
            "transformers: %s on %s (%s), %d sequences per call, context %d, %d adapters",
            config.model_path,
            self.device,
            str(dtype).removeprefix("torch."),
            self.n_parallel,
            self.n_ctx,
            len(self.adapters),
        )

    def _load_adapters(self, model: Any) -> Any:
        """The model wrapped in a PeftModel holding every adapter, or the model itself when there are none."""
        if not self.adapters:
            return model
        from peft import PeftModel

        for i, (name, path) in enumerate(self.adapters.items()):
            try:
                with warnings.catch_warnings():  # PEFT calls transformers APIs deprecated in newer releases
                    warnings.simplefilter("ignore", FutureWarning)
                    if i == 0:
                        model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
                    else:
                        model.load_adapter(path, adapter_name=name, is_trainable=False)
            except Exception as e:
                raise EngineError(f"transformers could not load adapter {name!r} from {path}: {e}") from e
        model.eval()
        return model

    def _unload(self) -> None:
        self._model = None
        self._tokenizer = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # -- the generation loop --------------------------------------------------------------

    def _run(self, take: _Take) -> None:
        while True:
            items = take(_TAKE_FACTOR * self.n_parallel, True)
            if not items:
                return
            rows = [row for row in map(self._prepare, items) if row is not None]
            for group in _groups(rows):
                for chunk in _chunks(group, self.n_parallel):
                    self._answer(group, chunk)

    def _answer(self, group: _Group, rows: list[_Row]) -> None:
        """Generates the answers of `rows` and hands each back; a failure fails these rows only."""
        if self._stopping:
            for row in rows:
                self._fail(row.item, "the transformers engine stopped", 503)
            return
        for row in rows:
            if row.item.cancelled:  # its batch was cancelled while it waited here
                self._done(row.item)
        rows = [row for row in rows if not row.item.cancelled]
        if not rows:
            return
        try:
            self._generate(group, rows)
        except Exception as exc:
            log.exception("transformers: generation failed")
            for row in rows:
                self._fail(row.item, f"transformers failed: {exc}", 500)
            return
        for row in rows:
            self._done(row.item)

    def _prepare(self, item: _Item) -> _Row | None:
        """Tokenizes a request's prompt, or fails the request (with a 400) saying why it cannot run."""
        gen = item.generation
        if gen.messages is not None and not getattr(self._tokenizer, "chat_template", None):
            self._fail(item, "This model has no chat template: send its rows to /v1/completions.")
            return None
        try:
            ids = hf_prompt_ids(self._tokenizer, gen)
        except Exception as exc:
            what = "apply the chat template" if gen.messages is not None else "tokenize the prompt"
            self._fail(item, f"could not {what}: {exc}")
            return None
        if not ids:
            self._fail(item, "The prompt is empty.")
            return None
        room = self.n_ctx - len(ids)
        if room < 1:
            self._fail(
                item,
                f"The prompt has {len(ids)} tokens, more than the context of {self.n_ctx} tokens per sequence "
                "allows (it must leave room for one answer token): shorten it or raise --n-ctx.",
            )
            return None
        gen.prompt_tokens = len(ids)
        return _Row(item, ids, room if gen.max_tokens is None else min(gen.max_tokens, room))

    def _generate(self, group: _Group, rows: list[_Row]) -> None:
        """Answers `rows` (one group's) with padded `generate` calls of at most `n_parallel` sequences."""
        seqs: list[_Seq] = []
        for row in rows:
            # Greedy choices are all the same answer: generate it once and copy it.
            copies = 1 if group.greedy else row.item.generation.n
            seqs += [_Seq(row) for _ in range(copies)]
        for start in range(0, len(seqs), self.n_parallel):
            self._call(group, seqs[start : start + self.n_parallel])
        for row in rows:
            gen = row.item.generation
            choices = [s.choice for s in seqs if s.row is row and s.choice is not None]
            if group.greedy:
                choices = [Choice(choices[0].text, choices[0].finish_reason, choices[0].tokens) for _ in range(gen.n)]
            gen.choices = choices

    def _call(self, group: _Group, seqs: list[_Seq]) -> None:
        """One `generate` call: the sequences' prompts left-padded to one length; fills each `_Seq.choice`."""
        import torch
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            StoppingCriteriaList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        width = max(len(s.row.ids) for s in seqs)
        input_ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s.row.ids)
            input_ids[i, width - n :] = torch.tensor(s.row.ids, dtype=torch.long)
            attention_mask[i, width - n :] = 1
        # transformers puts processors given here after its own; with its temperature and top-p
        # switched off, penalties come first, then temperature, then top-p, as OpenAI applies them.
        processors = LogitsProcessorList()
        if group.frequency_penalty or group.presence_penalty:
            processors.append(_Penalties(width, group.frequency_penalty, group.presence_penalty))
        if not group.greedy:
            if group.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(group.temperature))
            if group.top_p < 1.0:
                processors.append(TopPLogitsWarper(group.top_p))
        settings = GenerationConfig(
            max_new_tokens=max(s.row.limit for s in seqs),
            do_sample=not group.greedy,
            num_beams=1,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=self._eos or None,
            pad_token_id=self._pad,
        )
        stopping = StoppingCriteriaList([_PerSequenceStop(seqs, width, self._tokenizer)])
        model = self._model
        if group.seed is not None:
            torch.manual_seed(group.seed % _SEED_RANGE)
        elif not group.greedy:
            torch.seed()  # a seed of its own, whatever seeded call came before
        with self._adapter(group.adapter), torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=settings,
                logits_processor=processors,
                stopping_criteria=stopping,
            )
        generated = out[:, width:].tolist()
        for s, ids in zip(seqs, generated):
            s.choice = self._choice(s, ids)

    def _choice(self, seq: _Seq, ids: list[int]) -> Choice:
        """A sequence's answer: its tokens up to the end of sequence, its stop string or its limit."""
        gen = seq.row.item.generation
        end = seq.done_at if seq.done_at >= 0 else len(ids)
        ids = ids[: min(end, seq.row.limit)]
        eos = set(self._eos)
        for k, token in enumerate(ids):
            if token in eos:
                return Choice(self._decode(ids[:k]), "stop", k)
        text = self._decode(ids)
        if gen.stop:
            text, found = cut_at_stop(text, gen.stop)
            if found:
                return Choice(text, "stop", len(ids))
        return Choice(text, "length" if len(ids) >= seq.row.limit else "stop", len(ids))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _adapter(self, name: str | None) -> contextlib.AbstractContextManager[Any]:
        """Runs the model as `name` (an adapter) or as the base model (None)."""
        model = self._model
        if not self.adapters:
            return contextlib.nullcontext()
        if name is None:
            return model.disable_adapter()
        model.set_adapter(name)
        return contextlib.nullcontext()


class _PerSequenceStop:
    """Stops each sequence at its own token limit or stop string, recording when (`_Seq.done_at`).

    A `transformers.StoppingCriteria` by duck typing: generate calls it after every step and
    pads the sequences it reports done until the longest one ends.
    """

    def __init__(self, seqs: list[_Seq], width: int, tokenizer: Any) -> None:
        self.seqs = seqs
        self.width = width
        self.tokenizer = tokenizer
        # A stop string completed by the newest token lies within this many tokens of the end (a
        # character is at most 4 byte tokens), so only that tail is decoded at each step.
        self.tails = [4 * max(map(len, s.row.item.generation.stop), default=0) + 4 for s in seqs]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        made = input_ids.shape[1] - self.width
        done = [False] * len(self.seqs)
        tails: list[list[int]] | None = None
        for i, seq in enumerate(self.seqs):
            if seq.done_at < 0:
                stops = seq.row.item.generation.stop
                if made >= seq.row.limit:
                    seq.done_at = made
                elif stops:
                    if tails is None:  # one device-to-host copy per step, only when a sequence has stops
                        tails = input_ids[:, max(self.width, input_ids.shape[1] - max(self.tails)) :].tolist()
                    text = self.tokenizer.decode(tails[i][-min(self.tails[i], made) :], skip_special_tokens=True)
                    if any(s in text for s in stops):
                        seq.done_at = made
            done[i] = seq.done_at >= 0
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _Penalties:
    """OpenAI's frequency and presence penalties on the tokens generated so far (a logits processor)."""

    def __init__(self, width: int, frequency: float, presence: float) -> None:
        self.width = width
        self.frequency = frequency
        self.presence = presence

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _groups(rows: list[_Row]) -> Iterator[_Group]:
    """Rows by what one generate call must share; rows with a seed each in a group of their own."""
    groups: dict[tuple[Any, ...], _Group] = {}
    for row in rows:
        gen = row.item.generation
        greedy = gen.temperature == 0 or gen.top_p == 0
        sampling = (0.0, 1.0, None) if greedy else (gen.temperature, gen.top_p, gen.seed)
        key = (gen.adapter, greedy, *sampling, gen.frequency_penalty, gen.presence_penalty)
        if not greedy and gen.seed is not None:
            key = (*key, id(row))
        group = groups.get(key)
        if group is None:
            temperature, top_p, seed = sampling
            group = groups[key] = _Group(
                gen.adapter, greedy, temperature, top_p, gen.frequency_penalty, gen.presence_penalty, seed
            )
        group.rows.append(row)
    yield from groups.values()


def _chunks(group: _Group, n_parallel: int) -> Iterator[list[_Row]]:
    """A group's rows in runs of at most `n_parallel` sequences (a row with more choices alone).

    Rows of similar prompt length go together, so that little of each call is padding.
    """
    chunk: list[_Row] = []
    size = 0
    for row in sorted(group.rows, key=lambda r: len(r.ids)):
        n = 1 if group.greedy else row.item.generation.n
        if chunk and size + n > n_parallel:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += n
    if chunk:
        yield chunk


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _dtype(torch: Any, name: str | None, device: str, model_config: Any) -> Any:
    """The torch dtype to load in: --dtype; else float32 on CPU, the model's 16-bit dtype (or bfloat16) elsewhere."""
    if name is not None and name != "auto":
        key = _DTYPES.get(name.lower().removeprefix("torch."))
        if key is None:
            raise ConfigError(f"transformers: unknown --dtype {name!r}: use float32, bfloat16 or float16")
        return getattr(torch, key)
    if device == "cpu":
        return torch.float32
    own = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own.removeprefix("torch."), None)
    if own in (torch.float16, torch.bfloat16):
        return own
    return torch.float16 if device.startswith("mps") else torch.bfloat16


@contextlib.contextmanager
def _quiet_gguf_loader() -> Iterator[None]:
    """Hides the progress bar of transformers' GGUF loader, a tqdm of its own that `disable_progress_bar` misses."""
    try:
        from transformers import modeling_gguf_pytorch_utils as loader
    except ImportError:
        loader = None
    bar = getattr(loader, "tqdm", None)
    if bar is None:
        yield
        return
    loader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        loader.tqdm = bar


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "4.57.1" or "5.0.0rc1"."""
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


def _check_installed(adapters: bool) -> None:
    needed = ["torch", "transformers", *(["peft"] if adapters else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the transformers engine needs {' and '.join(missing)}: {INSTALL_TRANSFORMERS}")
