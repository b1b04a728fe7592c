"""The engine in its own process, and the API process's handle on it (vLLM v1's EngineCore / AsyncLLM split).

Why a process and not a thread: the model step and the event loop both run Python. In one process they share
the GIL, and each of a decode step's few hundred torch ops, when it returns from C++, waits for the event loop to
hand the GIL back: with 32 streams to serve, a batched step that takes 4.2 ms alone took ~10 ms in the server (a
one-off trace of the engine loop; a 10x shorter switch interval won back 17% of the throughput). In its own
process the engine loop runs undisturbed on its cores while the event loop parses requests and writes SSE on
another.

    API process                                          engine process (spawned; its main thread runs the loop)
    EngineClient.submit(job) -> sender thread ==[Submission / Abort, ...]==> Scheduler (read between iterations)
    job.events <- event loop (reads every POLL_S) <=======Outputs======= Scheduler.iterate()
                 the pipe: wakes for a parked reader, failures, and EOF when either process dies

Messages are pickled (by the C pickler) into two shared-memory rings (server/ring.py), one each way, so that a
busy engine loop makes no system call: one poll and one send of a pipe per iteration cost it 8-11% of its
speed (bench/engine_probes.py, probe 11). The engine reads what has arrived between iterations (a receiving
thread would take the GIL from the loop for every piece of a 300 KB snapshot) and writes one Outputs per
iteration; the event loop reads them on a timer while requests are in flight, and parks otherwise. The sender
thread writes everything queued so far as one list (so a burst of requests joins one engine iteration, not one
iteration each), and never lets a full ring block the event loop. Snapshots cross as bytes: the engine loads a
session's state and serialises the final one itself (a damaged snapshot comes back as the request's
SnapshotError). If the engine process dies, every request in flight gets EngineStopped, and /health and /ready
answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch
from safetensors.torch import load as load_safetensors

from engine import Engine, ModelConfig, SamplingParams, SessionState
from engine.state import read_snapshot
from engine.tokenizer import Tokenizer, load_tokenizer
from server.metrics import Metrics
from server.ring import Ring
from server.scheduler import (
    ClientGone,
    DoneEvent,
    EngineStopped,
    ErrorEvent,
    QueueFull,
    Scheduler,
    Submission,
    TokenEvent,
)

log = logging.getLogger("titans.engine")


@dataclass(frozen=True)
class EngineOptions:
    model: str
    device: str  # auto | cpu | cuda
    weights: str  # fp32 | fp16 | bf16
    compile: bool
    aot_decode: bool
    torch_threads: int  # 0: all cores but one
    max_running: int
    prefill_chunk: int


# --- messages -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Abort:
    job_id: int


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    fingerprint: str
    fresh_snapshot: bytes  # a new session's state: the API process's template for fresh states and checks


@dataclass(frozen=True)
class Failed:
    message: str  # the engine process's traceback


@dataclass(frozen=True)
class Outputs:
    """One engine iteration: its events, and what the gauges should read after it."""
    events: list[tuple[int, object]]
    running: int
    waiting: int
    queue_waits: list[float]  # seconds waited by the requests admitted in this iteration

    def __reduce__(self):
        """Pickled as plain tuples: a TokenEvent per session per step pickled as a dataclass, through
        multiprocessing's pickler, was ~35 us of every decode iteration of one session (after a step, with cold
        caches), 2% of it. Token events come first in the tuples, then the rest (an iteration's events for one
        request are at most a token and then its error)."""
        tokens = [(job_id, e.token_ids, e.text, e.surprise, e.finish_reason, e.stop_reason)
                  for job_id, e in self.events if type(e) is TokenEvent]
        others = [(job_id, e) for job_id, e in self.events if type(e) is not TokenEvent]
        return _outputs, (tokens, others, self.running, self.waiting, self.queue_waits)


def _outputs(tokens: list[tuple], others: list[tuple[int, object]], running: int, waiting: int,
             queue_waits: list[float]) -> Outputs:
    return Outputs([(job_id, TokenEvent(*fields)) for job_id, *fields in tokens] + others, running, waiting,
                   queue_waits)


def send(conn: Connection, message: object) -> None:
    """Messages cross the pipe pickled by the C pickler (multiprocessing's own pickler looks up a reducer for every
    object in a ChainMap, in Python: four times slower for an iteration's events)."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> object:
    return pickle.loads(conn.recv_bytes())


def _sender(ring: Ring, conn: Connection, outbox: queue.SimpleQueue, process: multiprocessing.Process) -> None:
    """Write what the event loop queued to the engine's ring: everything queued by then as one message (a list),
    because the engine reads between its iterations, and a burst of requests should join the same one (one by
    one, each 300 KB snapshot waited for an iteration: at 32 sessions, a prefill group of one request per
    iteration). A thread, so that a full ring never blocks the event loop."""
    def wait() -> None:
        if not process.is_alive():
            raise EOFError("the engine process has stopped")
        time.sleep(RING_WAIT_S)

    while True:
        batch = [outbox.get()]
        with contextlib.suppress(queue.Empty):
            while batch[-1] is not None:
                batch.append(outbox.get_nowait())
        stopping = batch[-1] is None
        messages = batch[:-1] if stopping else batch
        try:
            if messages:
                ring.write(pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL), lambda: send(conn, WAKE), wait)
        except Exception:  # the other side is gone (or a message would not pickle): nothing more can go
            log.exception("cannot send to the engine process")
            process.kill()  # the event loop then sees the pipe close and fails every request in flight
            return
        if stopping:
            return


RING_BYTES = 8 << 20  # each way; a message larger than this crosses in pieces
RING_WAIT_S = 0.0005  # a writer's pause while its ring is full
POLL_S = 0.001  # how often the event loop reads the engine's ring while requests are in flight
WAKE = None  # the pipe's message that says "read your ring"


def _portable(error: BaseException) -> BaseException:
    """error, or a RuntimeError that says what it was if error does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# --- the engine process ---------------------------------------------------------------------------------------


def engine_main(options: EngineOptions, conn: Connection, inbound: Ring, outbound: Ring) -> None:
    """The engine process: load, warm up, say Ready, then loop until Shutdown or the API process goes away."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        torch.set_num_threads(options.torch_threads or max(1, (os.cpu_count() or 2) - 1))
        device = None if options.device == "auto" else torch.device(options.device)
        engine = Engine.load(options.model, device=device, weight_dtype=_weight_dtype(options.weights),
                             compile=options.compile, aot_decode=options.aot_decode)
        engine.warm_up()
    except BaseException:
        send(conn, Failed(traceback.format_exc()))
        return
    # once serving, Ctrl-C (which reaches the whole process group) is the API process's to handle: it shuts down
    # gracefully, finishing the requests in flight, then stops this process with Shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    send(conn, Ready(engine.fingerprint, engine.new_state().to_bytes()))
    scheduler = Scheduler(engine, options.max_running, options.prefill_chunk)
    api = _API(conn)
    freeze_garbage_collector()
    try:
        while True:
            # Messages are read here, between iterations, by the loop itself (a receiving thread would take the
            # GIL from the loop in the middle of its steps); idle, the loop sleeps on the pipe until the API
            # process writes to the ring.
            for blob in inbound.read():
                for message in pickle.loads(blob):
                    if isinstance(message, Shutdown):
                        return
                    if isinstance(message, Abort):
                        scheduler.abort(message.job_id)
                    else:
                        scheduler.add(message)
            if not scheduler.busy:
                if inbound.park():
                    api.sleep()
                continue
            events = [(job_id, ErrorEvent(_portable(e.error)) if isinstance(e, ErrorEvent) else e)
                      for job_id, e in scheduler.iterate()]
            waits, scheduler.queue_waits = scheduler.queue_waits, []
            outputs = Outputs(events, scheduler.running, len(scheduler.waiting), waits)
            woke = outbound.write(pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL), api.wake, api.wait)
            if not woke and any(type(e) is not TokenEvent for _, e in events):
                api.wake()  # a request's end: its commit and the client's next request wait for it, not for a poll
            api.check_now_and_then()
    except APIGone:
        return
    except BaseException as e:  # the loop must never die silently, nor leave a request waiting
        log.exception("engine loop died")
        with contextlib.suppress(OSError, APIGone):
            failed = Outputs(scheduler.fail_all(EngineStopped(f"the engine failed: {e!r}")), 0, 0, [])
            outbound.write(pickle.dumps(failed), api.wake, api.wait)
            send(conn, Failed(traceback.format_exc()))


class _API:
    """The engine loop's view of the API process over the pipe: wakes in both directions, and its death (EOF)."""

    CHECK_EVERY_S = 1.0  # while busy the loop never reads the pipe, so it looks for EOF this often

    def __init__(self, conn: Connection):
        self.conn = conn
        self.checked_at = time.monotonic()

    def sleep(self) -> None:
        """Until the API process writes to the inbound ring (or a stale wake from an earlier park arrives)."""
        self._take()

    def wake(self) -> None:
        """The API process parked on its ring: this loop just published to it."""
        try:
            send(self.conn, WAKE)
        except (BrokenPipeError, ConnectionResetError):
            raise APIGone from None

    def wait(self) -> None:
        """The outbound ring is full: give the API process a moment to drain it."""
        if self.conn.poll(RING_WAIT_S):
            self._take()

    def check_now_and_then(self) -> None:
        if time.monotonic() - self.checked_at > self.CHECK_EVERY_S:
            self.checked_at = time.monotonic()
            while self.conn.poll():
                self._take()

    def _take(self) -> None:
        try:
            receive(self.conn)  # only wakes come this way
        except (EOFError, ConnectionResetError):
            raise APIGone from None


def freeze_garbage_collector() -> None:
    """Exempt everything made so far (the model, torch, the libraries: ~180k objects) from Python's collector. A
    full collection otherwise scans them all: ~90 ms in which no session advanced, a few times a minute in the
    engine loop at 32 sessions (a one-off gc.callbacks trace); once frozen, it scans only what serving makes."""
    gc.collect()
    gc.freeze()


class APIGone(Exception):
    """The pipe to the API process closed: the engine stops (and nothing it raises itself is mistaken for this)."""


def _weight_dtype(name: str) -> torch.dtype | None:
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# --- the API process's side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the API process knows of the served model, without its weights (which only the engine process
    loads): the config and tokenizer from the model directory; the fingerprint and a fresh session's tensors
    from the engine, which are enough to make fresh states and to check snapshots."""
    config: ModelConfig
    tokenizer: Tokenizer
    fingerprint: str
    template: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model_dir: str, ready: Ready) -> ModelInfo:
        config = ModelConfig.load(model_dir)
        template = {k: v.clone() for k, v in load_safetensors(ready.fresh_snapshot).items()}
        return cls(config, load_tokenizer(config.tokenizer, model_dir), ready.fingerprint, template)

    def new_state(self) -> SessionState:
        return SessionState.fresh(self.template, self.fingerprint)

    def load_state(self, blob: bytes) -> SessionState:
        """Raises SnapshotError for a corrupted snapshot or one made by another model."""
        return read_snapshot(blob, self.fingerprint, self.template)


@dataclass(eq=False)
class Job:
    """A request as the API process tracks it: its events arrive on `events`."""
    prompt_ids: list[int]
    snapshot: bytes | None
    params: SamplingParams
    want_surprise: bool
    keep_state: bool  # the final state comes back (to be committed)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    id: int = -1
    client: EngineClient | None = None
    generated: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None

    def cancel(self) -> None:
        """The engine drops the job at its next iteration; nothing is committed."""
        if self.client is not None:
            self.client.abort(self)

    def abort(self) -> None:
        """On the event loop: cancel, and wake whoever waits for the job's events."""
        self.cancel()
        self.events.put_nowait(ErrorEvent(ClientGone()))


class EngineClient:
    def __init__(self, options: EngineOptions, metrics: Metrics, max_waiting: int):
        self.options, self.metrics = options, metrics
        self.capacity = options.max_running + max_waiting
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.alive = False
        self.model: ModelInfo | None = None  # once started

    def start(self) -> None:
        """Spawn the engine process and wait until it has loaded and warmed up the model (blocking)."""
        context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's thread pools
        self._conn, child = context.Pipe()
        self._to_engine, self._from_engine = Ring(context, RING_BYTES), Ring(context, RING_BYTES)
        self.process = context.Process(target=engine_main, name="titans-engine", daemon=True,
                                       args=(self.options, child, self._to_engine, self._from_engine))
        self.process.start()
        child.close()
        try:
            message = receive(self._conn)
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine process exited with {self.process.exitcode} while loading") from None
        if isinstance(message, Failed):
            raise RuntimeError(f"the engine process could not load the model:\n{message.message}")
        self.model = ModelInfo.of(self.options.model, message)
        self._sender = threading.Thread(target=_sender, name="engine-client-sender", daemon=True,
                                        args=(self._to_engine, self._conn, self._outbox, self.process))
        self._sender.start()
        self.alive = True

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver the engine's messages on this event loop. While requests are in flight it reads the engine's
        ring every POLL_S (a timer here, so that the engine loop never makes a system call to wake this
        process); with none, it parks, and the pipe wakes it. The pipe is also how it learns that the engine
        process died (EOF)."""
        self._loop = loop
        self._polling: asyncio.Handle | None = None
        loop.add_reader(self._conn.fileno(), self._on_pipe)
        self._poll_soon()

    def stop(self) -> None:
        if self.alive:
            self._outbox.put(Shutdown())
        self._outbox.put(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._detach()
        self._lost("the server is shutting down")

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise EngineStopped("the engine process has stopped")
        if len(self.jobs) >= self.capacity:
            raise QueueFull(f"{len(self.jobs)} requests in the engine (limit {self.capacity})")
        job.id, job.client = next(self._ids), self
        self.jobs[job.id] = job
        self._outbox.put(Submission(job.id, job.prompt_ids, job.snapshot, job.params, job.want_surprise,
                                    job.keep_state))
        self._poll_soon()

    def abort(self, job: Job) -> None:
        if self.jobs.pop(job.id, None) is not None and self.alive:
            self._outbox.put(Abort(job.id))

    # --- the engine's messages, on the event loop -----------------------------------------------------------

    def _poll_soon(self) -> None:
        if self._loop is not None and self._polling is None:
            self._polling = self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        self._polling = None
        self._read_ring()
        if self.jobs:
            self._polling = self._loop.call_later(POLL_S, self._poll)
        elif not self._from_engine.park():  # something came in since the read
            self._poll_soon()

    def _read_ring(self) -> None:
        for blob in self._from_engine.read():
            self._deliver(pickle.loads(blob))

    def _on_pipe(self) -> None:
        """A wake (the engine wrote to the ring while this side was parked, or a request ended: read at once, not
        at the next poll), a failure report, or EOF."""
        try:
            message = receive(self._conn)
        except (EOFError, OSError):  # the engine process is gone: what it wrote before dying still counts
            self._read_ring()
            self._detach()
            self.process.join(1)
            self._lost(f"the engine process has stopped (exit code {self.process.exitcode})")
            return
        if isinstance(message, Failed):
            log.error("the engine process failed:\n%s", message.message)
        self._read_ring()
        self._poll_soon()

    def _detach(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(Exception):  # already removed, or stop() is called off the loop's thread
            self._loop.remove_reader(self._conn.fileno())
        if self._polling is not None:
            self._polling.cancel()
            self._polling = None

    def _deliver(self, out: Outputs) -> None:
        now = time.perf_counter()
        m = self.metrics
        for job_id, event in out.events:
            job = self.jobs.get(job_id)
            if job is None:  # aborted: the engine's events for it were already in flight
                continue
            if isinstance(event, TokenEvent):
                self._observe_tokens(job, len(event.token_ids), now)
            else:  # the job's last event
                del self.jobs[job_id]
            if isinstance(event, DoneEvent):
                m.finished(len(job.prompt_ids), job.generated, now - job.submitted_at, event.finish_reason)
                if event.snapshot is not None:
                    m.state_bytes.observe(len(event.snapshot))
                    m.memory_save.observe(event.save_s)
            job.events.put_nowait(event)
        for wait in out.queue_waits:
            m.queue_time.observe(wait)
        m.running.set(out.running)
        m.sessions_active.set(out.running)
        m.waiting.set(out.waiting)

    def _observe_tokens(self, job: Job, count: int, now: float) -> None:
        if job.first_token_at is None:
            self.metrics.ttft.observe(now - job.submitted_at)
            job.first_token_at = now
        else:
            self.metrics.itl.observe(now - job.last_token_at)
        job.last_token_at = now
        job.generated += count
        self.metrics.generation_tokens.inc(count)

    def _lost(self, why: str) -> None:
        """The engine is gone: every request still waiting on it fails."""
        self.alive = False
        jobs, self.jobs = self.jobs, {}
        for job in jobs.values():
            job.events.put_nowait(ErrorEvent(EngineStopped(why)))
