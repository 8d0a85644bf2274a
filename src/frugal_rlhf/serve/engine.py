"""The generation worker: one thread owns the model and runs batches.

Batching is static and per-step: requests that arrive while a batch runs wait in a
bounded queue; when the batch ends, up to `max_batch` waiting requests start together
as one left-padded batch through `generation.sample` (KV cache). Each row keeps its own
temperature / top_p / seed / max_tokens / stop strings (see sampler.RowSampler) and
streams its text as soon as each step produces it. A row ends on EOS, a stop string, its
max_tokens, a cancel (client gone) or non-finite scores (that row alone fails); when every
row has ended the batch stops at once. Rows of different LoRA adapters share a batch
(see sampler.RowSampler).

The engine knows nothing about HTTP or asyncio: each Job carries an `emit` callback that
receives Delta / Finished / Failed events on the worker thread.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from frugal_rlhf.data.tokenize import stop_tokens
from frugal_rlhf.generation import SampleConfig, sample
from frugal_rlhf.serve.sampler import RowSampler, RowSettings, TokenLogprob
from frugal_rlhf.serve.tokens import IncrementalDecoder, StopMatcher

log = logging.getLogger("frugal_rlhf")


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] | None = None  # of the tokens since the last Delta, when asked for


@dataclass
class Finished:
    reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    settings: RowSettings = field(default_factory=RowSettings)
    stop: tuple[str, ...] = ()
    emit: Callable[[object], None] = lambda event: None
    cancelled: bool = False  # set from any thread; read by the worker between steps

    def cancel(self) -> None:
        self.cancelled = True


class QueueFull(Exception):
    pass


class _Row:
    """Bookkeeping for one request inside a running batch."""

    def __init__(self, job: Job, tokenizer, eos: set[int]):
        self.job, self.eos = job, eos
        self.decoder = IncrementalDecoder(tokenizer)
        self.stopper = StopMatcher(job.stop)
        self.count = 0  # generated tokens that belong to the text (the final EOS is not counted)
        self.done = False
        # Logprobs of tokens whose text is still held back (half a character, a possible stop
        # string): they travel with the next Delta that carries text.
        self.pending: list[TokenLogprob] | None = [] if job.settings.top_logprobs is not None else None

    def _send(self, text: str) -> None:
        if text or self.pending:
            self.job.emit(Delta(text, self.pending))
            self.pending = [] if self.pending is not None else None

    def feed(self, token: int, logprob: TokenLogprob | None = None) -> None:
        if token in self.eos:
            return self.finish("stop")
        self.count += 1
        if self.pending is not None and logprob is not None:
            self.pending.append(logprob)
        self._send(self.stopper.push(self.decoder.push(token)))
        if self.stopper.stopped:
            self.finish("stop")
        elif self.count >= self.job.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if not self.stopper.stopped:
            self._send(self.stopper.push(self.decoder.flush()))
            self._send(self.stopper.flush())
        if self.stopper.stopped:
            reason = "stop"
        self.done = True
        self.job.emit(Finished(reason, len(self.job.prompt_ids), self.count))

    def fail(self, message: str) -> None:
        self.done = True
        self.job.emit(Failed(message))


def default_threads() -> int:
    """Torch threads for the worker: one core fewer than this process may use (at least one).

    The server has other busy threads (the event loop writing SSE, tokenizing), and OpenMP
    threads that wait for each other at every op turn pathological once any of them loses
    its core: on a shared 2-core machine a 20-token answer took 7-23 s with torch's default
    of 2 threads and 1.5 s with 1.
    """
    return max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else 1


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, gather_seconds: float = 0.01,
                 threads: int | None = None, adapters: tuple[str, ...] = ()):
        self.model, self.tokenizer = model, tokenizer
        # torch intra-op threads for the worker. OpenMP settings are per thread, so this
        # must be applied on the worker thread itself.
        self.threads = threads or default_threads()
        self.adapters = tuple(adapters)  # LoRA adapter names loaded on the model (peft), besides the base
        self.max_batch, self.max_queue = max_batch, max_queue
        # Before starting a batch that is not full, wait this long for companions: clients
        # that fire together then share a batch instead of the first one running alone.
        self.gather_seconds = gather_seconds
        self.eos = stop_tokens(tokenizer, model)
        self._eos_set = set(self.eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or (0,))[0]
        self.device = next(model.parameters()).device
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._closed = False
        self._counters = {"batches": 0, "largest_batch": 0, "cancelled": 0}
        self._thread = threading.Thread(target=self._loop, name="frugal-serve-worker", daemon=True)

    def start(self) -> "Engine":
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.emit(Failed("server shutting down"))
            self._queue.clear()
            for row in self._rows:
                row.job.cancel()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of `jobs` (the n choices of one request) or none of them."""
        with self._cond:
            if self._closed:
                raise QueueFull("server shutting down")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._queue.extend(jobs)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            queued = sum(not j.cancelled for j in self._queue)
            active = sum(not r.done for r in self._rows)  # a cancelled row counts until the worker drops it
            counters = dict(self._counters)
        return {"active": active, "queued": queued, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "threads": self.threads, **counters}

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._closed and not self._queue:
                self._cond.wait()
            deadline = time.monotonic() + self.gather_seconds
            while not self._closed and len(self._queue) < self.max_batch and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            if self._closed:
                return None
            batch = []
            while self._queue and len(batch) < self.max_batch:
                job = self._queue.popleft()
                if not job.cancelled:  # its client left while it waited
                    batch.append(job)
                else:
                    self._counters["cancelled"] += 1
            if batch:
                self._counters["batches"] += 1
                self._counters["largest_batch"] = max(self._counters["largest_batch"], len(batch))
            self._rows = [_Row(job, self.tokenizer, self._eos_set) for job in batch]
            return batch

    def _loop(self) -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._serve_batches()
        finally:
            torch.set_num_threads(previous)  # the setting also reaches process-wide pools (MKL)

    def _serve_batches(self) -> None:
        while (batch := self._take_batch()) is not None:
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception as err:  # a bad batch must not kill the worker
                log.exception("generation failed")
                for row in self._rows:
                    if not row.done:
                        row.fail(f"generation failed: {err}")
            finally:
                with self._cond:
                    self._rows = []

    def _run_batch(self, batch: list[Job]) -> None:
        rows = self._rows
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in batch])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in batch])
        wrapped = RowSampler(self.model, [j.settings for j in batch], multi_adapter=bool(self.adapters))
        config = SampleConfig(max_new_tokens=max(j.max_tokens for j in batch), temperature=0.0,
                              eos_token_ids=self.eos, pad_token_id=self.pad_id)

        def on_step(tokens, finished) -> bool:
            for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if row.done:
                    continue
                if row.job.cancelled:
                    row.done = True  # nobody listens any more: drop the result
                    with self._cond:
                        self._counters["cancelled"] += 1
                elif i in wrapped.failed:
                    row.fail("generation failed for this request: the model's scores were not finite (NaN or inf)")
                else:
                    row.feed(token, wrapped.logprobs[i])
            return not all(row.done for row in rows)  # False stops the whole batch

        started = time.perf_counter()
        sample(wrapped, ids.to(self.device), mask.to(self.device), config, on_step=on_step)
        for row in rows:  # only reachable if sample() stopped early for its own reasons
            if not row.done and not row.job.cancelled:
                row.finish("length")
        log.debug("batch of %d done in %.2fs", len(batch), time.perf_counter() - started)
