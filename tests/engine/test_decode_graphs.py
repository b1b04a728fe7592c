"""Decode through static buffers and bucketed batch sizes (compiled.GraphDecode) is the plain decode step.

On a CPU the graphs are not captured ("static"): the same step runs on the same static inputs, padded to the
bucket, over the batch's pool; a CUDA device replays what was captured from exactly that (tests/kernels run the
capture where there is one)."""

from __future__ import annotations

import pytest
import torch

from engine.compiled import GraphDecode
from engine.engine import SessionBatch
from tests.engine.helpers import VARIANTS, assert_close, engine_for, tiny, tokens


def run(engine, prompts, steps_before_churn: int, steps_after: int):
    """Prefill sessions of different lengths, decode, then one leaves and two join, decode again. Returns every
    step's logits and the sessions' final states."""
    gen = torch.Generator().manual_seed(5)
    batch = SessionBatch(engine, [engine.new_state()], capacity=1)  # grows as sessions join: graphs made anew
    batch.forward([prompts[0]])
    out = []

    def join_then_decode(joining_prompts, steps):
        for prompt in joining_prompts:
            joining = engine.batch([engine.new_state()])
            joining.forward([prompt])
            joining.move([0], into=batch)
        for _ in range(steps):
            out.append([lg for lg, _ in batch.forward([[int(t)] for t in tokens(len(batch), gen)])])

    join_then_decode(prompts[1:3], steps_before_churn)
    batch.remove([1])
    join_then_decode(prompts[3:5], steps_after)
    return out, [batch.state(i) for i in range(len(batch))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_static_buffer_decode_equals_the_plain_step(variant):
    cfg = tiny(variant)
    gen = torch.Generator().manual_seed(1)
    prompts = [tokens(n, gen) for n in (5, 9, 2, 7, 12)]  # positions that end chunks and segments apart
    steps = 2 * max(cfg.chunk_size, cfg.segment_size) + 1
    plain = run(engine_for(cfg, seed=3, dtype=torch.float64, decode_graphs="off"), prompts, steps, steps)
    static = run(engine_for(cfg, seed=3, dtype=torch.float64, decode_graphs="static"), prompts, steps, steps)
    for a, b in zip(plain[0], static[0], strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape == (1, cfg.vocab_size)
            assert_close(x, y, tol=1e-9)
    for a, b in zip(plain[1], static[1], strict=True):
        assert a.tokens_seen == b.tokens_seen
        for name in a.tensors:
            assert_close(a.tensors[name], b.tensors[name], tol=1e-9)


def test_buckets_and_the_free_slots():
    engine = engine_for(tiny("mal"), decode_graphs="static")
    batch = SessionBatch(engine, [engine.new_state() for _ in range(3)], capacity=6)
    graphs = batch._graph_decode()
    assert [graphs.bucket(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="7 sessions for a pool of 6"):
        graphs.bucket(7)
    with torch.inference_mode():  # free slots are uninitialised memory (NaN is never equal to itself)
        for v in batch._pool.values():
            v[3:] = 7
    free = {k: v[3:].clone() for k, v in batch._pool.items()}
    batch.forward([[1], [2], [3]])  # bucket 4: slot 3 is padding
    assert all(torch.equal(batch._pool[k][3:], free[k]) for k in free)  # a free slot is left as it was
    assert isinstance(batch._graphs, GraphDecode) and set(batch._graphs.graphs) == {4}


def test_the_scheduler_captures_every_bucket_at_start_and_none_later():
    from engine.core import EngineRequest, Scheduler
    from engine.sampling import SamplingParams

    engine = engine_for(tiny("mal"), decode_graphs="static")
    scheduler = Scheduler(engine, max_running=6, prefill_chunk=16)
    graphs = scheduler.decoding.batch._graphs
    assert set(graphs.graphs) == {1, 2, 4, 6}
    assert graphs.buckets() == [1, 2, 4, 6]
    made = dict(graphs.graphs)
    for i in range(5):
        scheduler.add(EngineRequest(i, [1, 2, 3], None, SamplingParams(max_tokens=4, temperature=0), False))
    while scheduler.busy:
        scheduler.iterate()
    assert scheduler.decoding.batch._graphs is graphs and graphs.graphs == made  # the same captures, replayed
    assert Scheduler(engine_for(tiny("mal")), 6, 16).decoding.batch._graphs is None  # off: nothing made


def test_decode_graphs_are_checked():
    with pytest.raises(ValueError, match="auto, cuda, static or off"):
        engine_for(tiny("lmm"), decode_graphs="always")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            engine_for(tiny("lmm"), decode_graphs="cuda")
    assert engine_for(tiny("lmm")).decode_graphs == "off"  # asked for, until a GPU run has checked the capture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_graph_decode_equals_the_plain_step(variant, monkeypatch):
    from engine import Engine

    monkeypatch.setenv("TITANS_KERNEL_PRECISION", "tf32")  # the products served on a GPU, on both sides
    cfg = tiny(variant)
    gen = torch.Generator().manual_seed(1)
    prompts = [tokens(n, gen) for n in (5, 9, 2, 7, 12)]
    steps = 2 * max(cfg.chunk_size, cfg.segment_size) + 1
    plain, graphs = (run(Engine.from_config(cfg, seed=3, device="cuda", decode_graphs=mode), prompts, steps, steps)
                     for mode in ("off", "cuda"))
    for a, b in zip(plain[0], graphs[0], strict=True):
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, tol=1e-4)
    for a, b in zip(plain[1], graphs[1], strict=True):
        for name in a.tensors:
            assert_close(a.tensors[name], b.tensors[name], tol=1e-4)
