"""The engine thread (DESIGN §5): admit -> one batched step -> emit, forever.

Requests join the running batch between steps (continuous batching across sessions, each with its own memory),
prompts are read in chunks of `prefill_chunk` tokens, and every event goes back to the asyncio side with
call_soon_threadsafe, so the event loop never runs model math and never waits on it.

A job's life: its prompt is read chunk by chunk; then each step samples one token from the last logits and
feeds it back in the next step, so the final state has read every generated token (as Engine.generate does).
A token that ends the request (EOS, stop string, max_tokens) is still fed once, then the job leaves the batch
with its final state. A step's events for all its jobs cross to the event loop in one call_soon_threadsafe:
one wake-up of the loop per step, not per token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from engine import Engine, SamplingParams, SessionState
from engine.sampling import sample
from engine.tokenizer import StreamDecoder

log = logging.getLogger("titans.scheduler")


class QueueFull(Exception):
    pass


class EngineStopped(RuntimeError):
    pass


class ClientGone(Exception):
    """The client disconnected: its request is abandoned (nothing is committed)."""


@dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]  # one per step; several once merged (Runtime, when a stream falls behind)
    text: str  # the new text these tokens complete (held back while it may be the start of a stop string)
    surprise: list[float]  # surprise of the tokens the memory read in the steps that produced these tokens
    finish_reason: str | None  # set on the request's last token: "stop" | "length"
    stop_reason: str | None = None  # the stop string that ended the request, if one did

    def then(self, later: TokenEvent) -> TokenEvent:
        """This event and the next one of the same request as one."""
        return TokenEvent(self.token_ids + later.token_ids, self.text + later.text, self.surprise + later.surprise,
                          later.finish_reason, later.stop_reason)


@dataclass(frozen=True)
class DoneEvent:
    state: SessionState  # after the prompt and every generated token
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    surprise: list[float]  # of the tokens read after the last TokenEvent
    record: object = None  # the session's record after the commit (set by the runtime, not the engine)


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


class StopStrings:
    """Streams text while never emitting the start of a stop string that may still complete."""

    def __init__(self, engine: Engine, stops: tuple[str, ...]):
        self.decoder = StreamDecoder(engine.tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.matched: str | None = None

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string completed)."""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.pending += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            cut, self.matched = min(hits)
            text, self.pending = self.pending[:cut], ""
            return text, True
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    state: SessionState
    params: SamplingParams
    want_surprise: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    # engine-thread bookkeeping
    read: int = 0  # prompt tokens fed so far
    next_input: int | None = None  # the sampled token to feed in the next step
    generated: list[int] = field(default_factory=list)
    pending_surprise: list[float] = field(default_factory=list)  # of prompt chunks read before the first token
    finish_reason: str | None = None  # set when the last token is sampled; the job ends after feeding it
    first_token_at: float | None = None
    last_token_at: float | None = None
    stops: StopStrings | None = None
    generator: torch.Generator | None = None

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

    def abort(self) -> None:
        """On the event loop: drop the job and wake whoever waits for its events."""
        self.cancelled.set()
        self.events.put_nowait(ErrorEvent(ClientGone()))


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class Scheduler:
    def __init__(self, engine: Engine, max_running: int, max_waiting: int, prefill_chunk: int, metrics=None):
        self.engine = engine
        self.max_running, self.max_waiting, self.prefill_chunk = max_running, max_waiting, prefill_chunk
        self.metrics = metrics
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.batch = None
        self._outbox: list[tuple[Job, object]] = []  # this iteration's events, sent together by _flush
        self._wake = threading.Condition()
        self._stopping = False
        self.alive = True
        self._thread = threading.Thread(target=self._loop, name="titans-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._wake:
            if not self.alive:
                raise EngineStopped("the engine thread has stopped")
            if len(self.running) + len(self.waiting) >= self.max_running + self.max_waiting:
                raise QueueFull(f"{len(self.running)} requests running and {len(self.waiting)} waiting")
            self.waiting.append(job)
            self._wake.notify()
        self._gauges()

    # --- the loop -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        admitted: list[Job] = []
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.waiting and not self.running:
                        self._wake.wait()
                    if self._stopping:
                        break
                    admitted = []
                    while self.waiting and len(self.running) + len(admitted) < self.max_running:
                        admitted.append(self.waiting.popleft())
                self._admit(admitted)
                admitted = []
                self._drop_cancelled()
                if self.running:
                    self._step()
                self._flush()
                self._gauges()
        except BaseException as e:  # the engine thread must never die silently, nor leave a request waiting
            log.exception("engine thread died")
            with self._wake:
                self.alive = False
                doomed = admitted + list(self.waiting) + self.running
                self.waiting.clear()
            self._flush()
            for job in doomed:
                job.emit(ErrorEvent(e))
            raise

    def _admit(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.cancelled.is_set():
                continue
            if self.metrics:
                self.metrics.queue_time.observe(time.perf_counter() - job.submitted_at)
            try:
                job.stops = StopStrings(self.engine, job.params.stop)
                if job.params.seed is not None:
                    job.generator = torch.Generator(device=self.engine.device).manual_seed(job.params.seed)
                if self.batch is None:
                    self.batch = self.engine.batch([job.state])
                else:
                    self.batch.add([job.state])
            except Exception as e:
                self._send(job, ErrorEvent(e))
                continue
            self.running.append(job)

    def _drop_cancelled(self) -> None:
        gone = [i for i, job in enumerate(self.running) if job.cancelled.is_set()]
        if gone:
            self._remove(gone)

    def _remove(self, indices: list[int]) -> None:
        self.batch.remove(indices)
        drop = set(indices)
        self.running = [job for i, job in enumerate(self.running) if i not in drop]
        if not self.running:
            self.batch = None

    def _inputs(self, job: Job) -> list[int]:
        if job.read < len(job.prompt_ids):
            chunk = job.prompt_ids[job.read:job.read + self.prefill_chunk]
            job.read += len(chunk)
            return chunk
        token, job.next_input = job.next_input, None
        return [token]

    def _step(self) -> None:
        inputs = [self._inputs(job) for job in self.running]
        want_surprise = any(job.want_surprise for job in self.running)
        try:
            out = self.batch.forward(inputs, return_surprise=want_surprise)
        except Exception as e:  # the batch is poisoned: fail its jobs (their sessions are untouched)
            log.exception("engine step failed")
            for job in self.running:
                self._send(job, ErrorEvent(e))
            self.running, self.batch = [], None
            return
        done = []
        now = time.perf_counter()
        for i, (job, (logits, surprise)) in enumerate(zip(self.running, out)):
            try:
                if self._advance(job, i, logits, surprise, now):
                    done.append(i)
            except Exception as e:  # one request's failure (sampling, decoding) is that request's alone
                log.exception("request failed in the engine")
                self._send(job, ErrorEvent(e))
                done.append(i)
        if done:
            self._remove(done)

    def _advance(self, job: Job, i: int, logits, surprise, now: float) -> bool:
        """Account for the rows job just fed; sample its next token. True when the job has finished."""
        job.pending_surprise += surprise.tolist() if job.want_surprise else []
        if job.read < len(job.prompt_ids):
            return False
        read_surprise, job.pending_surprise = job.pending_surprise, []
        if job.finish_reason is not None or job.params.max_tokens == 0:
            self._finish(job, i, read_surprise)
            return True
        token = sample(logits[-1], job.params, job.generator)
        job.generated.append(token)
        eos = self.engine._is_eos(token)
        text, stopped = (job.stops.finish(), False) if eos else job.stops.push(token)  # EOS adds no text
        if eos or stopped:
            job.finish_reason = "stop"
        elif len(job.generated) >= job.params.max_tokens:
            job.finish_reason = "length"
            text += job.stops.finish()
        job.next_input = token
        self._observe_token(job, now)
        self._send(job, TokenEvent((token,), text, read_surprise, job.finish_reason, job.stops.matched))
        return False

    def _finish(self, job: Job, index: int, surprise: list[float]) -> None:
        state = self.batch.state(index)
        reason = job.finish_reason or "length"
        self._send(job, DoneEvent(state, len(job.prompt_ids), len(job.generated), reason, surprise))
        if self.metrics:
            self.metrics.finished(job, reason)

    def _observe_token(self, job: Job, now: float) -> None:
        if self.metrics:
            if job.first_token_at is None:
                self.metrics.ttft.observe(now - job.submitted_at)
            else:
                self.metrics.itl.observe(now - job.last_token_at)
            self.metrics.generation_tokens.inc()
        if job.first_token_at is None:
            job.first_token_at = now
        job.last_token_at = now

    def _send(self, job: Job, event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Hand this iteration's events to their event loops, one call per loop."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in outbox:
            by_loop.setdefault(job.loop, []).append((job.events, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to read these
                loop.call_soon_threadsafe(_deliver, items)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.running.set(len(self.running))
            self.metrics.sessions_active.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))
