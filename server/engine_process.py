"""The engine in its own process, and the API process's handle on it (vLLM v1's EngineCore / AsyncLLM split).

Why a process and not a thread: the model step and the event loop both run Python. In one process they share
the GIL, and each of a decode step's few hundred torch ops, when it returns from C++, waits for the event loop to
hand the GIL back, so a batched step serving many streams takes several times as long as alone. In its own
process the engine loop runs undisturbed on its cores while the event loop parses requests and writes SSE on
another.

    API process                                          engine process (spawned; its main thread runs the loop)
    EngineClient.submit(job) -> sender thread --[EngineRequest / Abort]--> Scheduler (read between iterations)
    job.events <- event loop <- receiver thread <------Outputs------- Scheduler.iterate()

Messages are pickled over one duplex pipe. The engine has no thread besides its loop: it reads what has arrived
between iterations (a receiving thread would take the GIL from the loop for every piece of a 300 KB snapshot it
read off the pipe), and sends one Outputs per iteration. The API side never blocks its event loop on the pipe:
a sender thread sends everything queued so far as one list (so a burst of requests joins one engine iteration,
not one iteration each), and a receiver thread hands each iteration's events to the loop in one
call_soon_threadsafe. Snapshots cross as bytes: the engine loads a session's state and serialises the final one
itself (a damaged snapshot comes back as the request's SnapshotError). If the engine process dies, every
request in flight gets EngineStopped, and /health and /ready answer 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch
from safetensors.torch import load as load_safetensors

from engine import Engine, ModelConfig, SessionState
from engine.core import (
    ClientGone,
    DoneEvent,
    EngineRequest,
    EngineStopped,
    ErrorEvent,
    QueueFull,
    Scheduler,
    TokenEvent,
)
from engine.state import read_snapshot
from engine.tokenizer import ChatTemplate, Tokenizer, load_tokenizer
from server.metrics import Metrics

log = logging.getLogger("titans.engine")


@dataclass(frozen=True)
class EngineOptions:
    model: str
    device: str  # auto | cpu | cuda
    weights: str  # fp32 | fp16 | bf16 | int8
    compile: bool
    aot_decode: bool
    torch_threads: int  # 0: all CPUs but one (plan_cpus)
    max_running: int
    prefill_chunk: int
    cpus: frozenset[int] | None = None  # the engine process's CPUs (CpuPlan.engine); None: not pinned
    stream_interval_s: float = 0.0  # Outbox: 0 sends every iteration's events at once
    decode_graphs: str = "auto"  # auto | cuda | off (Engine)


# --- messages -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Abort:
    request_id: int


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


@dataclass(slots=True)
class Outputs:
    """One engine iteration: its events, and what the gauges should read after it."""
    events: list[tuple[int, object]]
    running: int
    waiting: int
    queue_waits: list[float]  # seconds waited by the requests admitted in this iteration

    def __reduce__(self):
        """Pickled as plain tuples, in one pass over the events: a dataclass per session per step is pickled field
        by field, on every decode iteration. Token events come first, then the rest (an iteration's events for one
        request are at most a token and then its error)."""
        tokens, others = [], []
        for request_id, e in self.events:
            if type(e) is TokenEvent:
                tokens.append((request_id, e.token_ids, e.text, e.surprise, e.finish_reason, e.stop_reason))
            else:
                others.append((request_id, e))
        return _outputs, (tokens, others, self.running, self.waiting, self.queue_waits)


def _outputs(tokens: list[tuple], others: list[tuple[int, object]], running: int, waiting: int,
             queue_waits: list[float]) -> Outputs:
    return Outputs([(request_id, TokenEvent(*fields)) for request_id, *fields in tokens] + others, running, waiting,
                   queue_waits)


def send(conn: Connection, message: object) -> None:
    """Messages cross the pipe pickled by the C pickler (multiprocessing's own pickler looks up a reducer for every
    object in a ChainMap, in Python)."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> object:
    return pickle.loads(conn.recv_bytes())


def _sender(conn: Connection, outbox: queue.SimpleQueue, stop_engine: Callable[[], None]) -> None:
    """Send what the event loop queued: everything queued by then as one message (a list), because the engine reads
    between its iterations, and a burst of requests should join the same one (one by one, each snapshot would wait
    for an iteration, and the prefill batch would take one request per iteration)."""
    while True:
        batch = [outbox.get()]
        with contextlib.suppress(queue.Empty):
            while batch[-1] is not None:
                batch.append(outbox.get_nowait())
        stopping = batch[-1] is None
        messages = batch[:-1] if stopping else batch
        try:
            if messages:
                send(conn, messages)
        except Exception:  # the other side is gone (or a message would not pickle): nothing more can go
            log.exception("cannot send to the engine process")
            stop_engine()  # the receiver then sees the pipe close and fails every request in flight
            return
        if stopping:
            return


PIPE_BUFFER_BYTES = 4 << 20


def _widen(conn: Connection) -> None:
    """Let PIPE_BUFFER_BYTES wait in the socket (the kernel caps it at net.core.wmem_max): with the default buffer,
    smaller than one snapshot, the engine loop's send of an iteration's final snapshots (several when many requests
    finish together) waits for the API process to read them."""
    with socket.socket(fileno=os.dup(conn.fileno())) as view:  # a second handle on the same socket
        view.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)


def _portable(error: BaseException) -> BaseException:
    """error, or a RuntimeError that says what it was if error does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# --- the engine process ---------------------------------------------------------------------------------------


def engine_main(options: EngineOptions, conn: Connection) -> None:
    """The engine process: load, warm up, say Ready, then loop until Shutdown or the API process goes away."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if options.cpus is not None:  # first: the thread pools torch makes inherit it
            os.sched_setaffinity(0, options.cpus)
        torch.set_num_threads(options.torch_threads or plan_cpus("none", 0).threads)
        device = None if options.device == "auto" else torch.device(options.device)
        engine = Engine.load(options.model, device=device, weight_dtype=_weight_dtype(options.weights),
                             compile=options.compile, aot_decode=options.aot_decode,
                             decode_graphs=options.decode_graphs)
        engine.warm_up()
    except BaseException:
        send(conn, Failed(traceback.format_exc()))
        return
    # once serving, Ctrl-C (which reaches the whole process group) is the API process's to handle: it shuts down
    # gracefully, finishing the requests in flight, then stops this process with Shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    send(conn, Ready(engine.fingerprint, engine.new_state().to_bytes()))
    scheduler = Scheduler(engine, options.max_running, options.prefill_chunk)
    outbox = Outbox(conn, options.stream_interval_s)
    arrived = _arrival_check(conn)
    freeze_garbage_collector()
    try:
        while True:
            # Messages are read here, between iterations, by the loop itself: a receiving thread would take the
            # GIL from the loop for every piece of a snapshot it reads off the pipe, in the middle of its steps.
            # Idle, the loop sleeps in recv until a request comes.
            while not scheduler.busy or arrived():
                for message in _received(conn):
                    if isinstance(message, Shutdown):
                        return
                    if isinstance(message, Abort):
                        scheduler.abort(message.request_id)
                        outbox.forget(message.request_id)
                    else:
                        scheduler.add(message)
            events = [(request_id, ErrorEvent(_portable(e.error)) if isinstance(e, ErrorEvent) else e)
                      for request_id, e in scheduler.iterate()]
            waits, scheduler.queue_waits = scheduler.queue_waits, []
            try:
                outbox.put(events, waits, scheduler.running, len(scheduler.waiting), idle=not scheduler.busy)
            except (BrokenPipeError, ConnectionResetError):
                raise APIGone from None
    except APIGone:
        return
    except BaseException as e:  # the loop must never die silently, nor leave a request waiting
        log.exception("engine loop died")
        with contextlib.suppress(OSError):
            send(conn, Outputs(scheduler.fail_all(EngineStopped(f"the engine failed: {e!r}")), 0, 0, []))
            send(conn, Failed(traceback.format_exc()))


class Outbox:
    """The engine loop's Outputs to the API process. With an interval, token events wait until it has passed
    since the last send and then go as one message: each send wakes the API process, which then competes with the
    loop for the CPU. Never held: a request's first token (time to first token), its last event, and anything
    when the loop is about to sleep."""

    def __init__(self, conn: Connection, interval_s: float):
        self.conn, self.interval_s = conn, interval_s
        self.events: list[tuple[int, object]] = []
        self.waits: list[float] = []
        self.streaming: set[int] = set()  # requests whose first token has gone
        self.sent_at = 0.0

    def put(self, events: list[tuple[int, object]], waits: list[float], running: int, waiting: int,
            idle: bool) -> None:
        if not self.interval_s:  # the default: every iteration goes out as it is, no bookkeeping
            send(self.conn, Outputs(events, running, waiting, waits))
            return
        self.events += events
        self.waits += waits
        urgent = idle
        for request_id, event in events:
            if type(event) is not TokenEvent:
                self.streaming.discard(request_id)
                urgent = True
            elif request_id not in self.streaming:
                self.streaming.add(request_id)
                urgent = True
        now = time.perf_counter()
        if urgent or now - self.sent_at >= self.interval_s:
            send(self.conn, Outputs(self.events, running, waiting, self.waits))
            self.events, self.waits, self.sent_at = [], [], now

    def forget(self, request_id: int) -> None:
        self.streaming.discard(request_id)


def _arrival_check(conn: Connection) -> Callable[[], bool]:
    """Whether a message (or the pipe's end) waits on conn, without blocking: one poll(2) on a poll object made
    once (Connection.poll builds a selector in Python for every call, once per iteration)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return lambda: bool(poller.poll(0))


def freeze_garbage_collector() -> None:
    """Exempt everything made so far (the model, torch, the libraries: hundreds of thousands of objects) from
    Python's collector. A full collection otherwise scans them all, a pause in which no session advances; once
    frozen, it scans only what serving makes."""
    gc.collect()
    gc.freeze()


class APIGone(Exception):
    """The pipe to the API process closed: the engine stops (and nothing it raises itself is mistaken for this)."""


def _received(conn: Connection) -> list:
    try:
        return receive(conn)
    except (EOFError, ConnectionResetError):  # reset: the API process died with our messages unread
        raise APIGone from None


@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs each process runs on (--engine-cpus). Unpinned, the kernel wakes the HTTP process (for every
    streamed token) on whichever CPU it likes, at times the engine's, and the engine process then waits runnable.
    Pinned, the engine's torch threads own their cores and the HTTP process keeps the rest. Opt-in: it is not
    shown to move the served rate (bench/serve.py)."""
    engine: frozenset[int] | None  # None: not pinned
    api: frozenset[int] | None
    threads: int  # the engine's torch threads

    def describe(self) -> str:
        if self.engine is None:
            return f"engine: {self.threads} torch threads, not pinned"
        return f"engine on CPUs {_cpu_list(self.engine)} ({self.threads} torch threads), " \
               f"HTTP on {_cpu_list(self.api) if self.api else 'every CPU'}"


def plan_cpus(spec: str, torch_threads: int, available: set[int] | None = None) -> CpuPlan:
    """spec: "auto" (the last `threads` of the CPUs this process may use go to the engine, the rest to HTTP;
    no pinning when the engine's threads would take them all), "none", or a list such as "2-7,9" (its CPUs go
    to the engine; HTTP keeps the others, or shares them when there are none). torch_threads 0: all CPUs but
    one for auto and none, the listed ones for a list."""
    if available is None:
        available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    default_threads = max(1, len(available) - 1)
    if spec == "none" or not hasattr(os, "sched_setaffinity"):
        return CpuPlan(None, None, torch_threads or default_threads)
    if spec == "auto":
        threads = torch_threads or default_threads
        if threads >= len(available):
            return CpuPlan(None, None, threads)
        ordered = sorted(available)
        return CpuPlan(frozenset(ordered[-threads:]), frozenset(ordered[:-threads]), threads)
    engine = parse_cpu_list(spec)
    if not engine <= available:
        raise ValueError(f"engine CPUs {_cpu_list(engine - available)} are not among this process's "
                         f"CPUs ({_cpu_list(available)})")
    return CpuPlan(frozenset(engine), frozenset(available - engine) or None, torch_threads or len(engine))


def parse_cpu_list(spec: str) -> set[int]:
    """"2-4,7" -> {2, 3, 4, 7} (the kernel's cpulist format)."""
    cpus = set()
    for part in spec.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or int(last or first) < int(first):
            raise ValueError(f"not a CPU list: {spec!r} (expected e.g. 2-7,9)")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _cpu_list(cpus: set[int] | frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


def pin_this_process(cpus: frozenset[int] | None) -> None:
    """Every thread of this process onto cpus (threads made later inherit their maker's)."""
    if cpus is None:
        return
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), cpus)


def _weight_dtype(name: str) -> torch.dtype | None:
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[name]


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
    chat: ChatTemplate

    @classmethod
    def of(cls, model_dir: str, ready: Ready) -> ModelInfo:
        config = ModelConfig.load(model_dir)
        template = {k: v.clone() for k, v in load_safetensors(ready.fresh_snapshot).items()}
        return cls(config, load_tokenizer(config.tokenizer, model_dir), ready.fingerprint, template,
                   ChatTemplate.load(model_dir))

    def new_state(self) -> SessionState:
        return SessionState.fresh(self.template, self.fingerprint)

    def load_state(self, blob: bytes, untrusted: bool = False) -> SessionState:
        """Raises SnapshotError for a corrupted snapshot, one made by another model, or (untrusted: an import)
        one out of a model state's bounds."""
        return read_snapshot(blob, self.fingerprint, self.template, untrusted)


@dataclass(eq=False)
class Job:
    """A request as the API process tracks it: the EngineRequest it sends (its id set on submit), and its events
    as they arrive on `events`."""
    request: EngineRequest
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
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
        self.stopping = False  # stop() was called: the engine's end is the server's, not a failure
        self.model: ModelInfo | None = None  # once started

    def start(self) -> None:
        """Spawn the engine process and wait until it has loaded and warmed up the model (blocking). Again after
        the engine died (restart): a new process, pipe and outbox; the model it loads must be the same one."""
        context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's thread pools
        self._outbox = queue.SimpleQueue()  # an earlier sender thread keeps the old one, and ends with it
        self._conn, child = context.Pipe()
        for end in (self._conn, child):
            _widen(end)
        self.process = context.Process(target=engine_main, args=(self.options, child), name="titans-engine",
                                       daemon=True)
        self.process.start()
        child.close()
        try:
            message = receive(self._conn)
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine process exited with {self.process.exitcode} while loading") from None
        if isinstance(message, Failed):
            raise RuntimeError(f"the engine process could not load the model:\n{message.message}")
        model = ModelInfo.of(self.options.model, message)
        if self.model is not None and model.fingerprint != self.model.fingerprint:
            self.process.kill()
            raise RuntimeError(f"the restarted engine loaded another model ({model.fingerprint}, was "
                               f"{self.model.fingerprint}): sessions of both cannot be served by one server")
        self.model = self.model or model
        self._sender = threading.Thread(target=_sender, args=(self._conn, self._outbox, self.process.kill),
                                        name="engine-client-sender",
                                        daemon=True)
        self._sender.start()
        self.alive = True

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver the engine's messages on this event loop: a thread receives them (the pipe stays blocking, which
        a loop reader would not leave it) and hands each to the loop with one call_soon_threadsafe."""
        self._loop = loop
        self._receiver = threading.Thread(target=self._receive, args=(self._conn, self.process),
                                          name="engine-client-receiver", daemon=True)
        self._receiver.start()

    def restart(self) -> None:
        """A new engine process after this one died (blocking: the model loads again); requests are taken again
        once it is up. Raises when it cannot start."""
        self._outbox.put(None)  # the dead engine's sender thread ends
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.join(5)
        self.start()
        self.attach(self._loop)

    def stop(self) -> None:
        self.stopping = True
        if self.alive:
            self._outbox.put(Shutdown())
        self._outbox.put(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._lost("the server is shutting down")

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise EngineStopped("the engine process has stopped")
        if len(self.jobs) >= self.capacity:
            raise QueueFull(f"{len(self.jobs)} requests in the engine (limit {self.capacity})")
        job.request, job.client = dataclasses.replace(job.request, request_id=next(self._ids)), self
        self.jobs[job.request.request_id] = job
        self._outbox.put(job.request)

    def abort(self, job: Job) -> None:
        if self.jobs.pop(job.request.request_id, None) is not None and self.alive:
            self._outbox.put(Abort(job.request.request_id))

    def _receive(self, conn: Connection, process) -> None:
        try:
            while True:
                message = receive(conn)
                if isinstance(message, Outputs):
                    self._loop.call_soon_threadsafe(self._deliver, message)
                elif isinstance(message, Failed):
                    log.error("the engine process failed:\n%s", message.message)
        except BaseException as e:  # EOF: the engine process is gone; anything else: it is unreachable
            if not isinstance(e, (EOFError, OSError)):
                log.exception("engine client receiver failed")
                process.kill()
            process.join(1)
            why = f"the engine process has stopped (exit code {process.exitcode})"
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone already
                self._loop.call_soon_threadsafe(self._lost, why)

    def _deliver(self, out: Outputs) -> None:
        now = time.perf_counter()
        m = self.metrics
        for request_id, event in out.events:
            job = self.jobs.get(request_id)
            if job is None:  # aborted: the engine's events for it were already in flight
                continue
            if isinstance(event, TokenEvent):
                self._observe_tokens(job, len(event.token_ids), now)
            else:  # the job's last event
                del self.jobs[request_id]
            if isinstance(event, DoneEvent):
                m.finished(len(job.request.prompt_ids), job.generated, now - job.submitted_at, event.finish_reason)
                m.engine_times(event.prefill_s, event.inference_s)
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
