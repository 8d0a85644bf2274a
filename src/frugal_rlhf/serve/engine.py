"""The generation worker: one thread owns the model and runs the continuous batch.

Batching is continuous (iteration-level): requests wait in a bounded queue only until a
slot of the engine's decode batch (generation.DecodeBatch) is free; then they join the
running batch at the next step (one prefill of the joiners' prompts), and each leaves the
moment it is done, its KV-cache slot reused by the next. A short request behind a long
one therefore finishes in its own few steps. `continuous=False` keeps the old static
policy (a batch starts only when the previous one has ended), for `frugal bench serve`.

Each row keeps its own temperature / top_p / seed / max_tokens / stop strings (see
sampler.RowSampler) and streams its text as soon as each step produces it. A row ends on
EOS, a stop string, its max_tokens, a cancel (client gone) or non-finite scores (that row
alone fails). Rows of different LoRA adapters share a batch (peft's mixed-batch inference).

The engine knows nothing about HTTP or asyncio: each Job carries an `emit` callback that
receives Delta / Finished / Failed events on the worker thread. A worker that dies (an error
outside a generation step) fails every waiting job, refuses new ones and says why (`failure`,
which /health reports): no request waits for a worker that is gone.
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
from frugal_rlhf.generation import DecodeBatch
from frugal_rlhf.serve.sampler import BASE, Pick, RowSampler, RowSettings, TokenLogprob, pick
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

    def __init__(self, job: Job, tokenizer, eos: set[int], device):
        self.job, self.eos = job, eos
        self.sampler = RowSampler(job.settings, device)
        self.next_token = 0  # the token the next decode step feeds for this row
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
                 threads: int | None = None, adapters: tuple[str, ...] = (), continuous: bool = True):
        self.model, self.tokenizer = model, tokenizer
        # torch intra-op threads for the worker. OpenMP settings are per thread, so this
        # must be applied on the worker thread itself.
        self.threads = threads or default_threads()
        self.adapters = tuple(adapters)  # LoRA adapter names loaded on the model (peft), besides the base
        self.max_batch, self.max_queue, self.continuous = max_batch, max_queue, continuous
        # Before starting from idle with a batch that is not full, wait this long for
        # companions: clients that fire together then share one prefill.
        self.gather_seconds = gather_seconds
        self.eos = stop_tokens(tokenizer, model)
        self._eos_set = set(self.eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or (0,))[0]
        self.device = next(model.parameters()).device
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []  # the running batch's rows, for stats() and close()
        self._closed = False
        self.failure: str | None = None  # why the worker died, once it has
        # batches: groups of requests that joined together; decode_steps: steps of the running batch
        self._counters = {"batches": 0, "largest_batch": 0, "cancelled": 0, "decode_steps": 0}
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
            if self.failure:
                raise QueueFull(f"the generation worker has stopped ({self.failure})")
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
                "threads": self.threads, "continuous": self.continuous, **counters}

    def _admit(self, batch: DecodeBatch) -> list[Job] | None:
        """The queued jobs that join now (up to the free slots); None once closed.

        Idle, this waits for work (and `gather_seconds` for companions); with rows running it
        never waits: they must not stall. Static batching admits only into an empty batch."""
        with self._cond:
            if not batch.active:
                while not self._closed and not self._queue:
                    self._cond.wait()
                deadline = time.monotonic() + self.gather_seconds
                while not self._closed and len(self._queue) < batch.free and time.monotonic() < deadline:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
            if self._closed:
                return None
            jobs: list[Job] = []
            if self.continuous or not batch.active:
                while self._queue and len(jobs) < batch.free:
                    job = self._queue.popleft()
                    if not job.cancelled:  # its client left while it waited
                        jobs.append(job)
                    else:
                        self._counters["cancelled"] += 1
            if jobs:
                self._counters["batches"] += 1
            return jobs

    def _loop(self) -> None:
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(self.threads)
            with torch.inference_mode():
                self._serve()
        except BaseException as err:  # noqa: BLE001 - the worker is gone: say so to every waiting request
            log.exception("the generation worker stopped")
            self._die(f"{type(err).__name__}: {err}")
        finally:
            torch.set_num_threads(previous)  # the setting also reaches process-wide pools (MKL)

    def _die(self, reason: str) -> None:
        with self._cond:
            self.failure, self._closed = reason, True
            for job in self._queue:
                job.emit(Failed(f"the generation worker has stopped ({reason})"))
            self._queue.clear()
            for row in self._rows:
                if not row.done:
                    row.fail(f"the generation worker has stopped ({reason})")

    def _serve(self) -> None:
        self.model.eval()
        batch = DecodeBatch(self.model, self.max_batch, adapters=bool(self.adapters))
        while (jobs := self._admit(batch)) is not None:
            try:
                if jobs:
                    self._join(batch, jobs)
                self._leave(batch)
                if batch.active:
                    self._feed(batch.rows, batch.step(torch.tensor([r.next_token for r in batch.rows],
                                                                   device=self.device)))
                    with self._cond:
                        self._counters["decode_steps"] += 1
                    self._leave(batch)
            except Exception as err:  # a failed step must not kill the worker
                log.exception("generation failed")
                for row in batch.rows:
                    if not row.done:
                        row.fail(f"generation failed: {err}")
                batch = DecodeBatch(self.model, self.max_batch, adapters=bool(self.adapters))
                self._publish(batch)

    def _join(self, batch: DecodeBatch, jobs: list[Job]) -> None:
        """One left-padded prefill of the joining prompts; their first tokens are picked at once."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        rows = [_Row(job, self.tokenizer, self._eos_set, self.device) for job in jobs]
        adapters = [j.settings.adapter or BASE for j in jobs] if self.adapters else None
        # Room for the tokens a typical answer needs now; a longer one grows the cache.
        room = max(min(j.max_tokens, 256) for j in jobs)
        logits = batch.join(ids.to(self.device), mask.to(self.device), rows, room, adapter_names=adapters)
        self._publish(batch)
        self._feed(rows, logits)

    def _feed(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token and hand it to the row (text, stop checks, events)."""
        picked: Pick = pick(logits, [row.sampler for row in rows])
        for row, token, failed, logprob in zip(rows, picked.tokens, picked.failed, picked.logprobs):
            if row.done:
                continue
            if row.job.cancelled:
                row.done = True  # nobody listens any more: drop the result
                with self._cond:
                    self._counters["cancelled"] += 1
            elif failed:
                row.fail("generation failed for this request: the model's scores were not finite (NaN or inf)")
            else:
                row.feed(token, logprob)
                row.next_token = token

    def _leave(self, batch: DecodeBatch) -> None:
        for row in batch.rows:
            if not row.done and row.job.cancelled:  # the client left between steps
                row.done = True
                with self._cond:
                    self._counters["cancelled"] += 1
        batch.leave([not row.done for row in batch.rows])
        self._publish(batch)

    def _publish(self, batch: DecodeBatch) -> None:
        with self._cond:
            self._rows = list(batch.rows)
            self._counters["largest_batch"] = max(self._counters["largest_batch"], batch.active)
