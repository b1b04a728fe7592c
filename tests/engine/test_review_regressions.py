"""Regression tests for edge cases found in review: aliasing, metadata tampering, sampling, streaming."""

from __future__ import annotations

import re

import pytest
import torch

from engine import SamplingParams, SnapshotError
from engine.sampling import sample
from engine.tokenizer import ByteTokenizer, StreamDecoder

from .helpers import assert_close, engine_for, tiny, tokens
from .test_state import _rewrite_header


def test_model_never_writes_into_states_it_does_not_own():
    # training builds batched states with expand() (one storage for all sessions); without gradients the
    # model must still copy before writing rows, or sessions would overwrite each other
    eng = engine_for(tiny("mag"))
    model = eng.model
    ids = [tokens(23), tokens(23)]
    with torch.no_grad():
        init = [[{k: v.unsqueeze(0).expand(2, *v.shape) for k, v in st.items()} for st in layer]
                for layer in model.initial_state()]
        logits, _, _ = model.forward_tokens(ids, init, [0, 0])
    for lg, seq in zip(logits, ids):
        assert_close(lg, eng.forward(seq, eng.new_state())[0], tol=1e-5)
    params = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.forward_tokens([tokens(9)], [[{k: v.unsqueeze(0) for k, v in st.items()} for st in layer]
                                           for layer in model.initial_state()], [0])
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name


def test_tampered_position_is_refused():
    eng = engine_for(tiny("lmm"))
    blob = eng.forward(tokens(30), eng.new_state())[1].to_bytes()
    for forged in ("00000000000000000031", "00000000000000000000"):
        with pytest.raises(SnapshotError, match="checksum"):
            eng.load_state(_rewrite_header(blob, lambda h, f=forged: h["__metadata__"].update(tokens_seen=f)))


def test_fingerprint_covers_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from engine import Engine

    fingerprints = []
    for i, corpus in enumerate(["alpha beta gamma", "delta epsilon zeta"]):
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator([corpus] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"]))
        (tmp_path / str(i)).mkdir()
        tok.save(str(tmp_path / str(i) / "tokenizer.json"))
        cfg = tiny("lmm", tokenizer="tokenizers", vocab_size=64)
        fingerprints.append(Engine.from_config(cfg, seed=0, device="cpu", tokenizer_dir=tmp_path / str(i)).fingerprint)
    assert fingerprints[0] != fingerprints[1]  # same weights, different tokenizer: snapshots must not mix


def test_from_config_leaves_the_callers_rng_alone():
    from engine import Engine, ModelConfig

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Engine.from_config(ModelConfig.preset("tiny-lmm"), seed=0, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_sampling_edge_cases():
    logits = torch.tensor([1.0, 3.0, 3.0, -2.0])
    assert sample(logits, SamplingParams(temperature=1e-45), None) == 1  # no overflow, greedy
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(top_k=1, seed=0), gen) for _ in range(30)}
    assert picks == {1}  # exactly one token survives top_k=1, even with a tie
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
    big = torch.tensor([1000.0, 999.0])
    assert sample(big, SamplingParams(temperature=1e-3), gen) == 0


def test_failed_step_poisons_a_running_batch(monkeypatch):
    eng = engine_for(tiny("lmm"))
    batch = eng.batch([eng.new_state()])
    batch.forward([[1, 2]])

    def broken(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(eng.model, "forward_tokens", broken)
    with pytest.raises(MemoryError):
        batch.forward([[3]])
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="rebuild"):
        batch.forward([[3]])
    with pytest.raises(ValueError, match="at least one session"):
        eng.batch([])


def test_stream_decoder_never_splits_characters():
    tok = ByteTokenizer()
    text = "naïve → 東京 🚀 done"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in tok.encode(text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_short_conv_serves_the_same_bits_it_trains_with():
    # serving sums the conv's taps one by one (faster than the unfolded product training differentiates): the
    # same products in the same order, so exactly the same values, for prompts and for decode steps
    from engine.model import ShortConv
    from engine.step import StepContext

    conv = ShortConv(96, 4)
    cfg = tiny("mag")
    gen = torch.Generator().manual_seed(3)
    for sessions, rows in ((3, 37), (5, 1)):
        x, tail = torch.randn(sessions, rows, 96, generator=gen), torch.randn(sessions, 3, 96, generator=gen)
        ctx = StepContext.build([10] * sessions, [rows] * sessions, cfg, torch.device("cpu"))
        with torch.no_grad():
            served, served_tail = conv(x, tail, ctx)
        trained, trained_tail = conv(x, tail, ctx)
        assert trained.requires_grad and not served.requires_grad
        assert torch.equal(served, trained) and torch.equal(served_tail, trained_tail)


def test_stream_decoder_releases_bytes_that_can_never_form_a_character():
    # a random model emits stray continuation bytes: held back for good, they would stall the stream and hide a
    # stop string made of them until the request ends
    decoder = StreamDecoder(ByteTokenizer())
    pieces = [decoder.push(t) for t in [104, 0xBF, 0xBF, 0xBF, 0xBF, 0xBF, 105]]
    assert "".join(pieces) + decoder.flush() == ByteTokenizer().decode([104] + [0xBF] * 5 + [105])
    assert "\ufffd" in "".join(pieces[:6])  # out before the stream ends
    decoder = StreamDecoder(ByteTokenizer())
    assert [decoder.push(t) for t in "é!".encode()] == ["", "é", "!"]  # an incomplete character still waits


@pytest.mark.parametrize("spec, complaint", [
    ({"stop": "</s>"}, "stop must be a list of non-empty strings"),  # a string would stop at each of its characters
    ({"stop": [""]}, "stop must be a list of non-empty strings"),  # every request would fail later, not the load
    ({"message": "{role"}, "does not format"),
    ({"message": "{speaker}: {content}"}, "names {speaker}"),
    ({"reply": 3}, "must be strings"),
    ({"turn": "x"}, "unknown fields"),
])
def test_a_chat_template_is_refused_at_load_with_a_reason(tmp_path, spec, complaint):
    import json

    from engine.tokenizer import ChatTemplate

    (tmp_path / "chat_template.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=re.escape(complaint)):
        ChatTemplate.load(tmp_path)


def test_a_chat_template_renders_messages_then_the_reply(tmp_path):
    from engine.tokenizer import ChatTemplate

    assert ChatTemplate.load(tmp_path).render([("user", "hi")]) == "<|user|>\nhi\n<|assistant|>\n"  # no file
    spec = '{"message": "[{role}] {content}\\n", "reply": "[me] ", "stop": ["["]}'
    (tmp_path / "chat_template.json").write_text(spec)
    template = ChatTemplate.load(tmp_path)
    assert template.render([("system", "a"), ("user", "b")]) == "[system] a\n[user] b\n[me] "
    assert template.stop == ("[",)
