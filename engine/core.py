"""The engine core (DESIGN §5): requests in, admit -> batched steps -> emit, typed events out.

Requests join between steps (continuous batching across sessions, each with its own memory). Sessions reading
their prompt and sessions generating sit in two batches, stepped one after the other in each iteration (decode
first, as vLLM schedules running requests first): the engine's steps are [sessions, rows] rectangles, so one
session prefilling in the generating batch would pad every generating session to its rows (at 32 sessions that
made prefill and decode each other's bottleneck, bench/serve.py). The prefill batch reads up to `prefill_chunk`
prompt tokens per session per iteration; a session that has read its whole prompt samples its first token from
the prefill's last logits and moves to the decode batch, which feeds one token per session per step, so the
final state has read every generated token (as Engine.generate does). A token that ends the request (EOS, stop
string, max_tokens) is still fed once, then the request leaves with its final state, serialised.

No asyncio, no pipes: `iterate()` runs one iteration and returns its events. The HTTP layer runs it in a process
of its own and sends each iteration's events to the API process in one message.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from .engine import Engine, SessionBatch
from .sampling import SamplingParams, sample
from .state import SessionState
from .tokenizer import StopStrings


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
    snapshot: bytes | None  # the state after the prompt and every generated token (None unless keep_state)
    tokens_seen: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    surprise: list[float]  # of the tokens read after the last TokenEvent
    save_s: float = 0.0  # seconds the engine spent serialising the snapshot
    prefill_s: float = 0.0  # in the engine: from joining the batch to the first token (all of it, with no tokens)
    inference_s: float = 0.0  # in the engine: from joining the batch to the end (prefill, then decode)
    record: object = None  # the session's record after the commit (set by the runtime, not the engine)


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


@dataclass(frozen=True)
class EngineRequest:
    """A request as the engine core takes it: token ids, the session's memory as snapshot bytes, sampling."""
    request_id: int
    prompt_ids: list[int]
    snapshot: bytes | None  # the session's memory; None: a fresh one (a stateless request)
    params: SamplingParams
    want_surprise: bool
    keep_state: bool = True  # send the final state back (False: a stateless or discarded request, nothing to save)


@dataclass(eq=False)
class Sequence:
    """A request's progress in the engine."""
    request: EngineRequest
    received_at: float = field(default_factory=time.perf_counter)
    admitted_at: float = 0.0  # when it joined the prefill batch
    first_token_at: float | None = None
    read: int = 0  # prompt tokens fed so far
    next_input: int | None = None  # the sampled token to feed in the next step
    generated: list[int] = field(default_factory=list)
    pending_surprise: list[float] = field(default_factory=list)  # of prompt chunks read before the first token
    finish_reason: str | None = None  # set when the last token is sampled; the request ends after feeding it
    stops: StopStrings | None = None
    generator: torch.Generator | None = None

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params


class Group:
    """Sequences and the SessionBatch that holds their states, in the same order; the batch's pool lives as long as
    the group."""

    def __init__(self, engine: Engine, capacity: int, decodes: bool = False):
        """decodes: the group whose steps are one-token decodes; its decode graphs are captured here, once."""
        self.seqs: list[Sequence] = []
        self.decodes = decodes
        self.batch = self._new_batch(engine, capacity)

    def _new_batch(self, engine: Engine, capacity: int) -> SessionBatch:
        batch = SessionBatch(engine, capacity=capacity)
        if self.decodes:
            batch.prepare_decode_graphs()
        return batch

    def add(self, seqs: list[Sequence], states: list[SessionState]) -> None:
        self.batch.add(states)
        self.seqs += seqs

    def remove(self, indices: list[int]) -> None:
        if indices:
            self.seqs = [self.seqs[i] for i in self.batch.remove(indices)]

    def move(self, indices: list[int], into: Group) -> None:
        """Sequences leave for `into`, their states slot to slot."""
        if indices:
            order = self.batch.move(indices, into.batch)
            into.seqs += [self.seqs[i] for i in indices]
            self.seqs = [self.seqs[i] for i in order]

    def reset(self) -> None:
        """An empty batch (after a failed step left this one half-written)."""
        self.seqs, self.batch = [], self._new_batch(self.batch.engine, self.batch.capacity)


class Scheduler:
    def __init__(self, engine: Engine, max_running: int, prefill_chunk: int):
        self.engine = engine
        self.max_running, self.prefill_chunk = max_running, prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling = Group(engine, max_running)
        self.decoding = Group(engine, max_running, decodes=True)
        self.aborted: set[int] = set()
        self.queue_waits: list[float] = []  # seconds each request admitted in this iteration waited
        self._outbox: list[tuple[int, object]] = []

    @property
    def running(self) -> int:
        return len(self.prefilling.seqs) + len(self.decoding.seqs)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: EngineRequest) -> None:
        self.waiting.append(Sequence(request))

    def abort(self, request_id: int) -> None:
        """Drop the request wherever it is, silently: the API side has already given up on it."""
        self.aborted.add(request_id)

    def iterate(self) -> list[tuple[int, object]]:
        """Drop the aborted, admit, one decode step, one prefill step: this iteration's (request_id, event)s. A
        session that finishes its prompt here samples its first token and decodes from the next iteration on, so
        each of its tokens leaves in an iteration of its own."""
        self._drop_aborted()
        self._admit()
        if self.decoding.seqs:
            self._step(self.decoding, prefill=False)
        if self.prefilling.seqs:
            self._step(self.prefilling, prefill=True)
        outbox, self._outbox = self._outbox, []
        return outbox

    def fail_all(self, error: BaseException) -> list[tuple[int, object]]:
        """The events not yet sent, then every request this engine still holds failed with error (the loop is
        going down)."""
        seqs = list(self.waiting) + self.prefilling.seqs + self.decoding.seqs
        self.waiting.clear()
        outbox, self._outbox = self._outbox, []
        return outbox + [(s.request.request_id, ErrorEvent(error)) for s in seqs]

    # --- one iteration ----------------------------------------------------------------------------------------

    def _admit(self) -> None:
        now = time.perf_counter()
        admitted, states = [], []
        while self.waiting and self.running + len(admitted) < self.max_running:
            seq = self.waiting.popleft()
            self.queue_waits.append(now - seq.received_at)
            try:
                state = self._state_it_came_with(seq)
                seq.stops = StopStrings(self.engine.tokenizer, seq.params.stop)
                if seq.params.seed is not None:
                    seq.generator = torch.Generator(device=self.engine.device).manual_seed(seq.params.seed)
            except Exception as e:  # a damaged snapshot (SnapshotError), a bad seed: this request's alone
                self._send(seq, ErrorEvent(e))
                continue
            seq.admitted_at = now
            admitted.append(seq)
            states.append(state)
        try:
            self.prefilling.add(admitted, states)
        except Exception as e:  # e.g. out of memory growing the prefill batch
            self._fail(admitted, e)

    def _drop_aborted(self) -> None:
        """Aborted requests leave at once, waiting or running (an Abort always arrives after its EngineRequest, so
        an id not found here belongs to a request that has already finished)."""
        if not self.aborted:
            return
        self.waiting = collections.deque(s for s in self.waiting if s.request.request_id not in self.aborted)
        for group in (self.prefilling, self.decoding):
            group.remove([i for i, s in enumerate(group.seqs) if s.request.request_id in self.aborted])
        self.aborted.clear()

    def _step(self, group: Group, prefill: bool) -> None:
        inputs = [self._inputs(seq) for seq in group.seqs]
        want_surprise = any(seq.request.want_surprise for seq in group.seqs)
        try:
            out = group.batch.forward(inputs, return_surprise=want_surprise)
        except Exception:  # the batch is half-written: each session again, alone, and only the culprits fail
            out = self._step_alone(group, inputs, want_surprise)
        leaving, moving = [], []
        picks = self._greedy_picks(group.seqs, out)
        for i, (seq, (logits, surprise)) in enumerate(zip(group.seqs, out)):
            try:
                outcome = self._advance(seq, group, i, logits, surprise, picks.get(i))
            except Exception as e:  # one request's failure (sampling, decoding) is that request's alone
                self._send(seq, ErrorEvent(e))
                outcome = "done"
            if outcome == "done":
                leaving.append(i)
            elif outcome == "generating" and prefill:
                moving.append(i)
        leaving_seqs = {group.seqs[i] for i in leaving}
        try:
            group.move(moving, self.decoding)
        except Exception as e:  # e.g. out of memory growing the decode batch: these requests fail, it goes on
            self._fail([group.seqs[i] for i in moving], e)
            leaving_seqs.update(group.seqs[i] for i in moving)
        group.remove([i for i, seq in enumerate(group.seqs) if seq in leaving_seqs])

    def _state_it_came_with(self, seq: Sequence) -> SessionState:
        snapshot = seq.request.snapshot
        return self.engine.new_state() if snapshot is None else self.engine.load_state(snapshot)

    def _step_alone(self, group: Group, inputs: list[list[int]], want_surprise: bool) -> list[tuple]:
        """After a batch step raised: every session of the group rebuilt from the snapshot it came with by reading
        again what it has read (recomputation: nothing is copied on the steps that succeed), then this step's
        inputs, alone. A session whose step fails alone gets the error; the others form the group's new batch,
        and their outputs of this step are returned in its order."""
        seqs, states, outputs = [], [], []
        for seq, step_ids in zip(group.seqs, inputs):
            try:
                alone = self.engine.batch([self._state_it_came_with(seq)])
                history = (seq.prompt_ids[:seq.read] + seq.generated)[:-len(step_ids)]
                for start in range(0, len(history), self.prefill_chunk):
                    alone.forward([history[start:start + self.prefill_chunk]])
                outputs += alone.forward([step_ids], return_surprise=want_surprise)
            except Exception as e:
                self._send(seq, ErrorEvent(e))
                continue
            seqs.append(seq)
            states.append(alone.state(0))
        group.reset()
        try:
            group.add(seqs, states)
        except Exception as e:  # e.g. out of memory rebuilding the batch
            self._fail(seqs, e)
            return []
        return outputs

    @staticmethod
    def _greedy_picks(seqs: list[Sequence], out: list[tuple]) -> dict[int, int]:
        """index -> argmax of the last logits, for the greedy requests, in one op; {} if that fails (each request
        then samples on its own and fails alone)."""
        greedy = [i for i, seq in enumerate(seqs) if seq.params.greedy]
        try:
            if len(greedy) == 1:  # no stack: for one session, the stack was half of its cost
                return {greedy[0]: int(out[greedy[0]][0][-1].argmax())}
            return dict(zip(greedy, torch.stack([out[i][0][-1] for i in greedy]).argmax(-1).tolist())) if greedy else {}
        except Exception:
            return {}

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            self._send(seq, ErrorEvent(error))

    def _inputs(self, seq: Sequence) -> list[int]:
        if seq.read < len(seq.prompt_ids):
            chunk = seq.prompt_ids[seq.read:seq.read + self.prefill_chunk]
            seq.read += len(chunk)
            return chunk
        token, seq.next_input = seq.next_input, None
        return [token]

    def _advance(self, seq: Sequence, group: Group, i: int, logits, surprise, greedy_pick: int | None) -> str:
        """Account for the rows seq just fed: "reading" (more prompt to go), "generating" (sampled a token to
        feed next) or "done" (finished, its final state sent). greedy_pick: the argmax of its last logits, taken
        for the whole batch in one op (per session, argmax and .item() were most of the loop's own time)."""
        seq.pending_surprise += surprise.tolist() if seq.request.want_surprise else []
        if seq.read < len(seq.prompt_ids):
            return "reading"
        read_surprise, seq.pending_surprise = seq.pending_surprise, []
        if seq.finish_reason is not None or seq.params.max_tokens == 0:
            started = time.perf_counter()
            snapshot = group.batch.to_bytes(i) if seq.request.keep_state else None
            done = time.perf_counter()
            first_token_at = done if seq.first_token_at is None else seq.first_token_at
            self._send(seq, DoneEvent(snapshot, group.batch.positions[i], len(seq.prompt_ids), len(seq.generated),
                                      seq.finish_reason or "length", read_surprise, done - started,
                                      first_token_at - seq.admitted_at, done - seq.admitted_at))
            return "done"
        token = greedy_pick if greedy_pick is not None else sample(logits[-1], seq.params, seq.generator)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        seq.generated.append(token)
        eos = self.engine.is_eos(token)
        text, stopped = (seq.stops.finish(), False) if eos else seq.stops.push(token)  # EOS adds no text
        if eos or stopped:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.params.max_tokens:
            seq.finish_reason = "length"
            text += seq.stops.finish()
        seq.next_input = token
        self._send(seq, TokenEvent((token,), text, read_surprise, seq.finish_reason, seq.stops.matched))
        return "generating"

    def _send(self, seq: Sequence, event) -> None:
        self._outbox.append((seq.request.request_id, event))
