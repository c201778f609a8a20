"""The generation engine: continuous batching of requests, depth-wise batching inside each step.

Every engine step (`Engine._step`):
1. the scheduler fills free slots from the queue (a request joins as soon as a slot frees and the
   KV budget allows), gives every running sequence without an item in flight its next item (the
   next prompt chunk, or the token it sampled last), and preempts the newest sequence when the
   step's worst-case page demand exceeds the budget (it is requeued and recomputed later);
2. depth-wise (default): the prelude runs once over the items that start a token, the shared
   block once over every item at any recursion depth (each item advances one depth per step,
   so tokens of different sequences at different depths share one call), the coda and output
   layer once over the items that left the recursion; final items sample their next token.
   `schedule="synchronous"` instead takes every item through all its depths within the step
   (one block call per depth over a shrinking set: how the exported model decodes), for
   comparison.
Finished requests leave at once, freeing their slot and pages.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from megamor.generation.requests import (SCHEDULES, Request, RequestError, Result,
                                         request_from_dict)
from megamor.generation.runner import Item, ModelRunner
from megamor.generation.sampling import new_generator, sample



@dataclass
class EngineConfig:
    max_batch: int = 32  # sequences in flight at most
    max_new_tokens: int = 64  # default per request
    block_size: int = 16  # entries per KV page
    kv_cache_bytes: int | None = None  # KV pool budget (None: grows as needed)
    prefill_chunk: int = 512  # prompt tokens per item
    schedule: str = "depthwise"

    def check(self) -> "EngineConfig":
        for name in ("max_batch", "max_new_tokens", "block_size", "prefill_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        return self


@dataclass
class EngineStats:
    steps: int = 0
    seconds: float = 0.0
    generated: int = 0
    prompt_tokens: int = 0
    preemptions: int = 0
    in_flight: int = 0  # summed over steps
    decode_tokens: int = 0  # tokens fed one at a time (a sampled token going back in)
    requests: int = 0
    passes: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def summary(self) -> dict:
        dec, pre = self.passes.get("decode", 0), self.passes.get("prefill", 0)
        return {"steps": self.steps, "seconds": self.seconds, "generated": self.generated,
                "tokens_per_s": self.generated / self.seconds if self.seconds else 0.0,
                "prompt_tokens": self.prompt_tokens, "preemptions": self.preemptions,
                "mean_in_flight": self.in_flight / max(self.steps, 1),
                "decode_tokens": self.decode_tokens,
                "layer_passes_per_decoded_token": dec / self.decode_tokens if self.decode_tokens else 0.0,
                "prefill_layer_passes": pre,
                "block_rows_per_call": self.calls.get("block_rows", 0) / max(self.calls.get("block", 0), 1),
                **{f"kv_{k}": v for k, v in self.cache.items()}}


class Sequence:
    __slots__ = ("index", "request", "prompt_ids", "generated", "slot", "fed", "pending", "item",
                 "generator", "max_new", "stop", "finish")

    def __init__(self, index: int, request: Request, prompt_ids: list[int], max_new: int, stop):
        self.index, self.request, self.prompt_ids = index, request, prompt_ids
        self.generated: list[int] = []
        self.slot: int | None = None
        self.fed = 0  # tokens whose K/V are in the cache
        self.pending = list(prompt_ids)  # tokens still to feed
        self.item: Item | None = None
        self.generator = new_generator(request)
        self.max_new, self.stop = max_new, stop
        self.finish: str | None = None


class Engine:
    """`Engine(model, codec)`: model a `MoRForCausalLM` (megamor.hf.modeling_mor; vanilla,
    recursive or MoR), codec an object with encode / decode / eos_token_id (or None: requests
    then give `prompt_ids`). `Engine.load(path)` reads a megamor checkpoint or an exported
    Hugging Face directory."""

    def __init__(self, model, codec=None, eos_token_id: int | None = None, **config):
        self.config = EngineConfig(**config).check()
        self.model = model.eval()
        self.runner = ModelRunner(self.model)
        self.codec = codec
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(codec, "eos_token_id", None)
        self.context = model.config.max_position_embeddings
        self.vocab = model.config.vocab_size
        self.stats = EngineStats()

    @classmethod
    def load(cls, path, **config) -> "Engine":
        from megamor.generation.loading import load_model

        model, codec = load_model(path)
        return cls(model, codec, **config)

    # ------------------------------------------------------------------ requests

    def prepare(self, requests: Iterable) -> list[Sequence]:
        """Validate and tokenize every request before anything runs (errors name the request)."""
        seqs = []
        for i, r in enumerate(requests):
            if isinstance(r, str):
                r = Request(prompt=r, where=f"request {i}")
            elif isinstance(r, dict):
                r = request_from_dict(r, f"request {i}")
            elif not r.where:
                r = dataclasses.replace(r, where=f"request {i}")
            r.check()
            if r.prompt_ids is not None:
                ids, field_ = list(r.prompt_ids), "prompt_ids"
            elif self.codec is None:
                raise RequestError(f"{r.where}: field 'prompt' needs a tokenizer, and this model "
                                   "has none: give 'prompt_ids'")
            else:
                ids, field_ = list(self.codec.encode(r.prompt)), "prompt"
            if not ids:
                raise RequestError(f"{r.where}: field {field_!r} is empty (no tokens to continue)")
            if len(ids) > self.context:
                raise RequestError(f"{r.where}: field {field_!r} has {len(ids)} tokens, more than "
                                   f"the model's context of {self.context} (max_position_embeddings)")
            bad = [t for t in ids if t >= self.vocab]
            if bad:
                raise RequestError(f"{r.where}: field {field_!r}: token id {bad[0]} is outside the "
                                   f"vocabulary of {self.vocab}")
            stop = set(r.stop_token_ids) if r.stop_token_ids is not None else (
                {self.eos_token_id} if self.eos_token_id is not None else set())
            seqs.append(Sequence(i, r, ids, r.max_new_tokens or self.config.max_new_tokens, stop))
        return seqs

    def generate(self, requests: Iterable) -> list[Result]:
        """Results in the order of the requests."""
        out = sorted(self.stream(requests), key=lambda r: r.index)
        return out

    # ------------------------------------------------------------------ the loop

    def stream(self, requests: Iterable) -> Iterator[Result]:
        """Results as requests finish (validation of all requests happens first)."""
        seqs = self.prepare(requests)
        cfg = self.config
        self.cache = self.runner.new_cache(cfg.max_batch, cfg.block_size, cfg.kv_cache_bytes)
        self.runner.passes = {"decode": 0, "prefill": 0}
        self.runner.calls = {"prelude": 0, "block": 0, "coda": 0, "block_rows": 0}
        self.stats = stats = EngineStats()
        stats.requests = len(seqs)
        stats.prompt_tokens = sum(len(s.prompt_ids) for s in seqs)
        self._fed = 0  # tokens fed, for the entries-per-token estimate of admission
        waiting: deque = deque(seqs)
        running: list[Sequence] = []
        free = list(range(cfg.max_batch - 1, -1, -1))
        t0 = time.perf_counter()
        try:
            while waiting or running:
                self._admit(waiting, running, free)
                for s in running:
                    if s.item is None:
                        s.item = self._next_item(s)
                self._fit(waiting, running, free)
                stats.steps += 1
                stats.in_flight += len(running)
                with torch.no_grad():
                    done = self._step(running)
                for s in done:
                    running.remove(s)
                    self.cache.release(s.slot)
                    free.append(s.slot)
                    stats.generated += len(s.generated)
                    stats.seconds = time.perf_counter() - t0
                    yield self._result(s)
        finally:
            stats.seconds = time.perf_counter() - t0
            stats.passes = dict(self.runner.passes)
            stats.calls = dict(self.runner.calls)
            stats.cache = self.cache.stats()

    def _next_item(self, s: Sequence) -> Item:
        chunk = s.pending[: self.config.prefill_chunk]
        return Item(s, s.slot, chunk, s.fed, final=len(chunk) == len(s.pending))

    def _worst_pages(self, s: Sequence) -> int:
        it = s.item
        cols = self.runner.step_cols(it.phase, it.depth, self.config.schedule == "synchronous")
        return self.cache.pages_needed(s.slot, cols, it.t) if cols else 0

    def _expected_pages(self, s: Sequence) -> float:
        """Pages the rest of `s` is expected to take: the tokens it has still to feed times the
        cache entries per token measured so far (all cache layers until anything ran)."""
        left = len(s.pending) + max(s.max_new - len(s.generated) - 1, 0)
        per_token = (self.cache.appended / self._fed if self._fed
                     else len(self.runner.cache_layers))
        return left * per_token / self.config.block_size

    def _admit(self, waiting: deque, running: list, free: list) -> None:
        """Waiting requests take free slots while the pages that the running sequences and the
        newcomer are expected to need still fit the budget (a model whose tokens store fewer
        entries, e.g. MoR with recursion-wise caching, fits more sequences)."""
        cols = len(self.runner.cache_layers)
        unbounded = self.cache.max_pages is None
        committed = 0.0 if unbounded else sum(self._expected_pages(r) for r in running)
        while waiting and free:
            s = waiting[0]
            need = 0.0 if unbounded else self._expected_pages(s) + cols  # + a partial page per list
            if running and committed + need > self.cache.pages_free():
                return
            waiting.popleft()
            s.slot = free.pop()
            running.append(s)
            committed += need

    def _fit(self, waiting: deque, running: list, free: list) -> None:
        """Preempt the newest sequences until the step's worst-case page demand fits."""
        if self.cache.max_pages is None:
            return  # the pool grows as needed
        while True:
            need = sum(self._worst_pages(s) for s in running)
            if need <= self.cache.pages_free():
                return
            if len(running) == 1:
                s = running[0]
                raise RequestError(
                    f"{s.request.where}: needs {need} KV pages of {self.cache.page_bytes} bytes "
                    f"for its next step, more than the KV budget holds "
                    f"({self.cache.max_pages} pages): raise the budget or shorten the prompt")
            s = running.pop()
            self.cache.release(s.slot)
            free.append(s.slot)
            s.slot, s.item, s.fed = None, None, 0
            s.pending = s.prompt_ids + s.generated  # recomputed when it runs again
            waiting.appendleft(s)
            self.stats.preemptions += 1

    def _step(self, running: list[Sequence]) -> list[Sequence]:
        items = [s.item for s in running]
        run = self.runner
        pre = [it for it in items if it.phase == "prelude"]
        if pre:
            run.prelude_stage(pre)
        if self.config.schedule == "depthwise":
            blk = [it for it in items if it.phase == "block"]
            if blk:
                run.block_stage(blk)
        else:
            while True:
                blk = [it for it in items if it.phase == "block"]
                if not blk:
                    break
                run.block_stage(blk)
        cod = [it for it in items if it.phase == "coda"]
        if not cod:
            return []
        logits = run.coda_stage(cod)
        return self._advance(cod, logits)

    def _advance(self, items: list[Item], logits) -> list[Sequence]:
        """After the coda: record what was fed, pick the next tokens, finish requests."""
        greedy = logits.argmax(-1).tolist() if logits is not None else []
        done, j = [], 0
        for it in items:
            s = it.seq
            s.fed += it.t
            self._fed += it.t
            self.stats.decode_tokens += it.t == 1
            s.pending = s.pending[it.t:]
            s.item = None
            if not it.final:
                continue
            tok = greedy[j] if s.generator is None else sample(logits[j], s.request, s.generator)
            j += 1
            s.generated.append(tok)
            if tok in s.stop:
                s.finish = "stop"
            elif len(s.generated) >= s.max_new:
                s.finish = "length"
            elif len(s.prompt_ids) + len(s.generated) > self.context:
                s.finish = "context"  # the next token would sit past the last position
            if s.finish:
                done.append(s)
            else:
                s.pending = [tok]
        return done

    def _result(self, s: Sequence) -> Result:
        text = None
        if self.codec is not None:
            body = s.generated[:-1] if s.finish == "stop" else s.generated
            text = self.codec.decode(body)
        return Result(s.index, s.request, s.prompt_ids, list(s.generated), text, s.finish)
