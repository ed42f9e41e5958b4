"""Continuous batching on herd's decode pieces: requests join and leave one running batch at step boundaries.

    submit(job) ─▶ bounded queue ─▶ worker thread, each step:
        admit: for each waiting job while a slot is free: `prefill` it alone (herd.text.generation.prefill,
               or the job's own prefill: images, audio) into a one-row cache, sample its first token,
               copy its K/V into a free row of the shared `SlotKVCache`
        step:  ONE forward of the base LLM over every active row, each at its own position
               (`decode_rows`: per-row RoPE, per-row cache write, a mask hiding each row's unused tail)
        leave: a row that sampled a stop token, ran out of tokens or was cancelled frees its slot; the
               last row moves into it, so the active rows stay 0..n-1 and the step reads views, not copies

`herd.text.generation.decode` keeps every row at one shared position (rows start together); a server
needs rows that start whenever their request arrives, hence per-row positions here. The loop's other
pieces are reused as they are: `prefill`, `decode_one_token` (jobs decoded alone), `sample_next` with a
per-request seeded generator (so a seeded request draws the same stream as `generate` would alone).

Jobs whose decode steps read per-request state besides the KV cache (an image model's cross-attention
K/V) are decoded alone (`Job.solo`), one token per worker step, interleaved with the batch: they still
join and leave at step boundaries but do not share the step's matmuls. Text and speech jobs (the audio
only enters through the prompt's embeddings) share the batch.

Shape legend: L layers, n active rows, R slots, S positions, K kv heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from herd.text.generation import SamplingParams, decode_one_token, prefill, sample_next, seeded_generator
from herd.text.kv_cache import KVCache
from herd.text.model import AttentionContext, Llama

log = logging.getLogger("herd.serve")


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queue` jobs already (the server answers 503)."""


@dataclass
class Event:
    """What the worker tells a job's owner: a token, the end (reason "stop" / "length" / "cancelled"),
    or a failure (message, safe to show a client)."""

    token: int | None = None
    finish: str | None = None
    error: str | None = None


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams  # max_new_tokens already capped by the caller to fit the cache
    emit: Callable[[Event], None]  # called on the worker thread
    # (cache length) → (one-row cache holding the prompt, logits of the next position (1, V)); None: the
    # base LLM's `prefill`. Runs on the worker thread, so it may bind inputs to the model.
    prefill: Callable[[int], tuple[KVCache, torch.Tensor]] | None = None
    solo: nn.Module | None = None  # decode alone with this model instead of joining the batch
    ignore_stop: bool = False  # vLLM's ignore_eos: run to max_new_tokens (load tests)
    cancelled: threading.Event = field(default_factory=threading.Event)


class SlotKVCache(KVCache):
    """A KV cache of R rows that each sit at their own position; `decode_rows` sets `positions` (n,)
    before a step and the n active rows are rows 0..n-1."""

    positions: torch.Tensor | None = None

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (n, 1, K, hd) of row r at positions[r] (start_pos is ignored: rows differ); return
        keys/values (n, S, K, hd) up to the furthest row, whose unused tails the step's mask hides."""
        assert self.positions is not None, "decode_rows sets the rows' positions"
        n = k.shape[0]
        rows = torch.arange(n, device=k.device)
        self.k[layer, rows, self.positions] = k[:, 0]
        self.v[layer, rows, self.positions] = v[:, 0]
        end = int(self.positions.max()) + 1
        return self.k[layer, :n, :end], self.v[layer, :n, :end]

    def put_row(self, row: int, one: KVCache, length: int) -> None:
        """Copy the first `length` positions of a one-row cache into `row`."""
        self.k[:, row, :length] = one.k[:, 0, :length]
        self.v[:, row, :length] = one.v[:, 0, :length]

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]


def decode_rows(
    model: Llama, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotKVCache
) -> torch.Tensor:
    """`decode_one_token` for rows at different positions: tokens (n, 1) at positions (n,) into rows
    0..n-1 of `cache`; the logits of each row's next position (n, V). The model's own layers and head."""
    cache.positions = positions
    S = int(positions.max()) + 1
    keys = torch.arange(S, device=tokens.device)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # (n, 1, 1, S): each row's own past
    cos_sin = (model.rope_cos[positions][:, None], model.rope_sin[positions][:, None])  # (n, 1, hd/2)
    ctx = AttentionContext(cos_sin, mask, start_pos=0)
    h = model.embed(tokens)  # (n, 1, D)
    for layer in model.layers.values():
        h = layer(h, ctx, cache)
    return model.head(h)[:, -1]  # (n, V)


@dataclass
class _Row:
    job: Job
    last: int  # the token to feed next
    pos: int  # its position
    made: int  # tokens generated so far
    generator: torch.Generator | None
    cache: KVCache | None = None  # solo jobs only


class Batcher:
    """One worker thread that decodes every submitted job; `max_batch` rows share a step, at most
    `max_queue` jobs wait. `submit` is thread-safe; events arrive through each job's `emit`."""

    def __init__(
        self,
        llm: Llama,
        stop_ids: frozenset[int] | set[int],
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        vocab_limit: int | None = None,  # sample ids below it only (a trimmed tokenizer's padded vocabulary)
    ) -> None:
        self.llm, self.stop_ids, self.vocab_limit = llm, frozenset(stop_ids), vocab_limit
        self.max_batch, self.max_seq_len = max_batch, max_seq_len or llm.args.max_seq_len
        self.device = next(llm.parameters()).device
        self.cache = llm.new_kv_cache(max_batch, self.max_seq_len, cache_cls=SlotKVCache)
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.rows: list[_Row] = []  # rows[i] lives in cache row i
        self.solo: list[_Row] = []
        self.steps = 0  # batched forward passes so far (a test reads it)
        self.max_rows_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="herd-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        if len(job.prompt) + job.params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens exceeds the server's context {self.max_seq_len}")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server's queue is full ({self.waiting.maxsize} waiting)") from None

    # --- the worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self.rows and not self.solo:
                try:  # idle: sleep on the queue rather than spin
                    self._admit(self.waiting.get(timeout=0.1))
                except queue.Empty:
                    continue
            while len(self.rows) + len(self.solo) < self.max_batch:
                try:
                    self._admit(self.waiting.get_nowait())
                except queue.Empty:
                    break
            with torch.inference_mode():
                self._guarded(self._step_batch, self.rows)
                for row in list(self.solo):
                    self._guarded(lambda r=row: self._step_solo(r), [row])

    def _guarded(self, fn: Callable[[], None], rows: list[_Row]) -> None:
        """A failing step fails its own jobs only: the worker and every other request go on."""
        try:
            fn()
        except Exception:
            log.exception("decode step failed")
            for row in list(rows):
                row.job.emit(Event(error="the model failed while decoding this request"))
                self._leave(row)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            with torch.inference_mode():
                total = len(job.prompt) + job.params.max_new_tokens
                if job.prefill is not None:
                    one, logits = job.prefill(total)
                else:
                    one = self.llm.new_kv_cache(1, total)
                    tokens = torch.tensor([job.prompt], dtype=torch.long, device=self.device)
                    logits = prefill(self.llm, tokens, one)  # (1, V)
                gen = seeded_generator(job.params.seed, self.device)
                row = _Row(job, last=-1, pos=len(job.prompt), made=0, generator=gen)
                if self._take(row, logits[0]):
                    return
                if job.solo is not None:
                    row.cache = one
                    self.solo.append(row)
                else:
                    self.cache.put_row(len(self.rows), one, len(job.prompt))
                    self.rows.append(row)
                    self.max_rows_seen = max(self.max_rows_seen, len(self.rows))
        except Exception as e:
            log.exception("prefill failed")
            job.emit(Event(error=f"the model could not read this prompt ({type(e).__name__})"))

    def _take(self, row: _Row, logits: torch.Tensor) -> bool:
        """Sample row's next token from logits (V,), emit it; True when the row is finished."""
        p = row.job.params
        if self.vocab_limit is not None:
            logits = logits[: self.vocab_limit]
        token = int(sample_next(logits[None], p.temperature, p.top_p, row.generator)[0])
        row.made += 1
        if row.job.cancelled.is_set():
            row.job.emit(Event(finish="cancelled"))
            return True
        if token in self.stop_ids and not row.job.ignore_stop:
            row.job.emit(Event(finish="stop"))
            return True
        row.job.emit(Event(token=token))
        if row.made >= p.max_new_tokens:
            row.job.emit(Event(finish="length"))
            return True
        row.last = token
        return False

    def _step_batch(self) -> None:
        if not self.rows:
            return
        tokens = torch.tensor([[r.last] for r in self.rows], dtype=torch.long, device=self.device)  # (n, 1)
        positions = torch.tensor([r.pos for r in self.rows], dtype=torch.long, device=self.device)  # (n,)
        logits = decode_rows(self.llm, tokens, positions, self.cache)  # (n, V)
        self.steps += 1
        finished = []
        for i, row in enumerate(self.rows):
            row.pos += 1
            if self._take(row, logits[i]):
                finished.append(row)
        for row in finished:
            self._leave(row)

    def _step_solo(self, row: _Row) -> None:
        assert row.job.solo is not None and row.cache is not None
        token = torch.tensor([[row.last]], dtype=torch.long, device=self.device)
        logits = decode_one_token(row.job.solo, token, row.cache, row.pos)  # (1, V)
        row.pos += 1
        if self._take(row, logits[0]):
            self._leave(row)

    def _leave(self, row: _Row) -> None:
        """Free the row's slot; the last batch row moves into it so the active rows stay 0..n-1."""
        if row in self.solo:
            self.solo.remove(row)
            return
        if row not in self.rows:
            return
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            moved = self.rows[last]
            self.cache.move_row(last, i, moved.pos)  # positions 0..pos-1 are written
            self.rows[i] = moved
        self.rows.pop()

    def stats(self) -> dict[str, Any]:
        return {
            "active": len(self.rows) + len(self.solo),
            "waiting": self.waiting.qsize(),
            "steps": self.steps,
        }


__all__ = ["Batcher", "Event", "Job", "QueueFull", "SlotKVCache", "decode_rows"]
