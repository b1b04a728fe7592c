"""The engine loop on its own (no process, no HTTP): requests that join at different iterations, with prompts
longer than a prefill chunk, stateful and fresh, end exactly as each would alone through Engine.complete."""

from __future__ import annotations

import collections

import pytest
import torch

from engine import SamplingParams, SnapshotError
from engine.core import DoneEvent, EngineRequest, ErrorEvent, Scheduler, TokenEvent
from tests.engine.helpers import VARIANTS, assert_states_close, engine_for, tiny


def run(scheduler: Scheduler, arrivals: dict[int, list[EngineRequest]], abort_at: dict[int, int] | None = None):
    """Iterate until idle; submissions join at their iteration. -> request_id -> events, in order."""
    events, iteration = collections.defaultdict(list), 0
    while scheduler.busy or any(at >= iteration for at in arrivals):
        for sub in arrivals.get(iteration, []):
            scheduler.add(sub)
        for request_id, at in (abort_at or {}).items():
            if at == iteration:
                scheduler.abort(request_id)
        for request_id, event in scheduler.iterate():
            events[request_id].append(event)
        iteration += 1
    return events


def tokens_of(events) -> list[int]:
    return [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids]


def test_staggered_requests_end_as_each_would_alone():
    for variant in VARIANTS:
        engine = engine_for(tiny(variant), seed=5, dtype=torch.float64)
        g = torch.Generator().manual_seed(7)
        earlier = engine.complete(torch.randint(0, 256, (37,), generator=g).tolist(), engine.new_state(),
                                  SamplingParams(max_tokens=3, temperature=0)).state
        cases = []  # (iteration it joins, prompt, snapshot or None, max_tokens)
        for at, length, stateful, max_tokens in [(0, 23, False, 9), (0, 5, True, 4), (0, 5, False, 7),
                                                 (2, 61, True, 6), (3, 1, False, 12), (3, 17, True, 0),
                                                 (7, 40, False, 5)]:
            prompt = torch.randint(0, 256, (length,), generator=g).tolist()
            cases.append((at, prompt, earlier.to_bytes() if stateful else None, max_tokens))
        scheduler = Scheduler(engine, max_running=4, prefill_chunk=16)  # 7 requests: some wait for a place
        arrivals = collections.defaultdict(list)
        for request_id, (at, prompt, snapshot, max_tokens) in enumerate(cases):
            arrivals[at].append(EngineRequest(request_id, prompt, snapshot, SamplingParams(max_tokens=max_tokens,
                                                                                    temperature=0), False))
        events = run(scheduler, arrivals)
        for request_id, (_, prompt, snapshot, max_tokens) in enumerate(cases):
            alone = engine.complete(prompt, engine.new_state() if snapshot is None else engine.load_state(snapshot),
                                    SamplingParams(max_tokens=max_tokens, temperature=0))
            done = events[request_id][-1]
            assert isinstance(done, DoneEvent), (variant, request_id, done)
            assert tokens_of(events[request_id]) == alone.token_ids, (variant, request_id)
            assert all(len(e.token_ids) == 1 for e in events[request_id][:-1])  # one token per iteration
            assert (done.prompt_tokens, done.completion_tokens) == (len(prompt), max_tokens)
            assert_states_close(engine.load_state(done.snapshot), alone.state)
            assert done.tokens_seen == alone.state.tokens_seen


def test_an_aborted_request_leaves_without_a_trace_and_the_others_continue():
    engine = engine_for(tiny("mal"), seed=5, dtype=torch.float64)
    params = SamplingParams(max_tokens=8, temperature=0)
    prompts = [list(b"abort me later"), list(b"keep going"), list(b"never admitted")]
    scheduler = Scheduler(engine, max_running=2, prefill_chunk=4)
    arrivals = {0: [EngineRequest(i, p, None, params, False) for i, p in enumerate(prompts)]}
    events = run(scheduler, arrivals, abort_at={0: 4, 2: 1})
    assert 2 not in events  # aborted while waiting: never ran
    assert not any(isinstance(e, DoneEvent) for e in events[0]) and len(tokens_of(events[0])) < 8
    assert tokens_of(events[1]) == engine.complete(prompts[1], engine.new_state(), params).token_ids
    assert not scheduler.busy and not scheduler.aborted


def test_a_damaged_snapshot_fails_its_own_request_only():
    engine = engine_for(tiny("lmm"), seed=5)
    params = SamplingParams(max_tokens=3, temperature=0)
    blob = bytearray(engine.new_state().to_bytes())
    blob[-5] ^= 0xFF
    scheduler = Scheduler(engine, max_running=4, prefill_chunk=8)
    events = run(scheduler, {0: [EngineRequest(0, [1, 2, 3], bytes(blob), params, False),
                                 EngineRequest(1, [1, 2, 3], None, params, False)]})
    assert len(events[0]) == 1 and isinstance(events[0][0], ErrorEvent)
    assert isinstance(events[0][0].error, SnapshotError)
    assert isinstance(events[1][-1], DoneEvent) and len(tokens_of(events[1])) == 3


@pytest.mark.parametrize("want_surprise", [True, False])
def test_surprise_covers_every_token_read(want_surprise):
    engine = engine_for(tiny("mag"), seed=5)
    prompt = list(b"a prompt of a few chunks")
    scheduler = Scheduler(engine, max_running=4, prefill_chunk=5)
    events = run(scheduler, {0: [EngineRequest(0, prompt, None, SamplingParams(max_tokens=4, temperature=0),
                                            want_surprise)]})
    read = sum(len(e.surprise) for e in events[0])
    assert read == (len(prompt) + 4 if want_surprise else 0)  # the prompt, then each generated token once fed


def test_aborted_requests_leave_the_queue_at_once_even_when_no_place_frees():
    engine = engine_for(tiny("lmm"), seed=5)
    scheduler = Scheduler(engine, max_running=1, prefill_chunk=8)
    for request_id in range(3):
        scheduler.add(EngineRequest(request_id, [1, 2, 3], None, SamplingParams(max_tokens=50, temperature=0), False))
    scheduler.iterate()
    scheduler.abort(1)
    scheduler.abort(2)
    scheduler.iterate()
    assert not scheduler.waiting and scheduler.running == 1  # their snapshots are not held until a place frees


def test_a_prompt_read_while_others_generate_never_pads_their_steps(monkeypatch):
    """Generating sessions step one row each even while a newcomer reads its prompt beside them: the two kinds of
    work run as separate batches, never as one [sessions, rows] rectangle padded to the prompt's rows."""
    from engine.engine import SessionBatch

    engine = engine_for(tiny("mal"), seed=5)
    calls = []
    forward = SessionBatch.forward

    def spy(self, token_ids, return_surprise=False):
        calls.append(sorted({len(t) for t in token_ids}))
        return forward(self, token_ids, return_surprise)

    monkeypatch.setattr(SessionBatch, "forward", spy)
    params = SamplingParams(max_tokens=12, temperature=0)
    events = run(Scheduler(engine, max_running=4, prefill_chunk=8),
                 {0: [EngineRequest(0, list(range(8)), None, params, False)],
                  3: [EngineRequest(1, list(range(24)), None, params, False),
                      EngineRequest(2, list(range(16)), None, params, False)]})
    assert [1] in calls and [8] in calls
    assert all(lengths in ([1], [8]) for lengths in calls), calls  # never a 1-token row beside an 8-token one
    assert all(isinstance(events[job][-1], DoneEvent) for job in range(3))


def test_a_request_that_keeps_no_state_gets_none_and_the_same_tokens():
    """Stateless and discarded requests: the engine does not serialise a final state nobody will commit."""
    engine = engine_for(tiny("mag"), seed=5)
    params = SamplingParams(max_tokens=6, temperature=0)
    prompt = list(b"no state to keep")
    events = run(Scheduler(engine, max_running=4, prefill_chunk=8),
                 {0: [EngineRequest(0, prompt, None, params, False, keep_state=False),
                      EngineRequest(1, prompt, None, params, False)]})
    dropped, kept = events[0][-1], events[1][-1]
    assert dropped.snapshot is None and kept.snapshot is not None
    assert tokens_of(events[0]) == tokens_of(events[1])
    assert dropped.tokens_seen == kept.tokens_seen == len(prompt) + 6


def test_requests_join_and_leave_the_running_batches_in_their_slot_pools():
    """The prefill and decode batches are allocated once, for max_running sessions: admitted requests are written
    into free slots and a session that has read its prompt moves slot to slot into the decode batch, so no join,
    leave or hand-over stacks a batch again (the pools keep their storage throughout)."""
    engine = engine_for(tiny("mac"), seed=5)
    scheduler = Scheduler(engine, max_running=8, prefill_chunk=8)
    groups = (scheduler.prefilling, scheduler.decoding)
    storage = [[v.data_ptr() for v in g.batch._pool.values()] for g in groups]
    params = SamplingParams(max_tokens=6, temperature=0)
    blob = bytearray(engine.new_state().to_bytes())
    blob[-5] ^= 0xFF  # one damaged snapshot among the newcomers fails alone
    events = run(scheduler, {0: [EngineRequest(0, list(range(5)), None, params, False)],
                             2: [EngineRequest(j, list(range(12)), None, params, False) for j in (1, 2, 3)]
                             + [EngineRequest(4, list(range(12)), bytes(blob), params, False)]})
    assert isinstance(events[4][0], ErrorEvent) and len(events[4]) == 1
    assert all(isinstance(events[j][-1], DoneEvent) and len(tokens_of(events[j])) == 6 for j in range(4))
    assert [[v.data_ptr() for v in g.batch._pool.values()] for g in groups] == storage
    assert all(g.batch.capacity == 8 and not g.seqs for g in groups)


def test_engine_times_split_a_request_at_its_first_token(monkeypatch):
    """prefill_s: joining the batch to the first token; inference_s: to the end (vLLM's request times). On a
    clock that moves one unit per iteration: a 61-token prompt read 16 tokens per iteration samples its first
    token in its 4th iteration, its 6th token in its 9th, and ends when that token is fed, in its 10th."""
    import engine.core as scheduler_module

    class Clock:
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            return cls.now

    monkeypatch.setattr(scheduler_module, "time", Clock)
    engine = engine_for(tiny("mal"), seed=1)
    scheduler = Scheduler(engine, max_running=4, prefill_chunk=16)
    params = SamplingParams(max_tokens=6, temperature=0)
    scheduler.add(EngineRequest(0, list(range(61)), None, params, False))
    scheduler.add(EngineRequest(1, list(range(20)), None, SamplingParams(max_tokens=0), False))  # reads, no tokens
    done = {}
    while scheduler.busy:
        done |= {request_id: e for request_id, e in scheduler.iterate() if isinstance(e, DoneEvent)}
        Clock.now += 1
    assert (done[0].prefill_s, done[0].inference_s) == (3.0, 9.0)
    assert done[1].prefill_s == done[1].inference_s == 1.0  # no first token: all of it is prefill


def test_a_request_whose_step_fails_fails_alone_and_the_batch_goes_on(monkeypatch):
    # one prompt holds a token id the model has no embedding for: the prefill step of the batch raises. Every
    # session is rebuilt from its snapshot and stepped alone; only that request gets the error. A decode step
    # that raises once (a transient fault) is recovered the same way: every request ends as it would alone.
    engine = engine_for(tiny("mac"), seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    earlier = engine.complete(torch.randint(0, 256, (19,), generator=g).tolist(), engine.new_state(),
                              SamplingParams(max_tokens=2, temperature=0)).state
    params = SamplingParams(max_tokens=6, temperature=0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (21, 30, 9)]
    bad = prompts[1][:12] + [10_000] + prompts[1][12:]  # in its second prefill chunk
    snapshots = [earlier.to_bytes(), None, None]
    subs = [EngineRequest(0, prompts[0], snapshots[0], params, False), EngineRequest(1, bad, None, params, False),
            EngineRequest(2, prompts[2], snapshots[2], params, True)]
    from engine.engine import SessionBatch

    forward, failures = SessionBatch.forward, []

    def fails_once_in_decode(self, token_ids, return_surprise=False):
        if not failures and all(len(t) == 1 for t in token_ids) and len(token_ids) == 2:
            failures.append(len(token_ids))
            raise RuntimeError("transient fault")
        return forward(self, token_ids, return_surprise)

    monkeypatch.setattr(SessionBatch, "forward", fails_once_in_decode)
    events = run(Scheduler(engine, max_running=4, prefill_chunk=8), {0: subs})
    assert failures == [2]
    assert len(events[1]) == 1 and isinstance(events[1][0], ErrorEvent)
    for request_id in (0, 2):
        state = engine.new_state() if snapshots[request_id] is None else engine.load_state(snapshots[request_id])
        alone = engine.complete(prompts[request_id], state, params)
        done = events[request_id][-1]
        assert isinstance(done, DoneEvent) and tokens_of(events[request_id]) == alone.token_ids
        assert_states_close(engine.load_state(done.snapshot), alone.state)
