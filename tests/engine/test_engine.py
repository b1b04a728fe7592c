"""Engine API: generation, sampling, checkpoints, tokenizers, surprise, input validation."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams
from engine.model import Titans
from engine.quant import Linear

from .helpers import assert_close, engine_for, tiny, tokens


@pytest.fixture(scope="module")
def engine():
    return engine_for(tiny("mac"))


def _run(gen):
    out = []
    while True:
        try:
            out.append(next(gen))
        except StopIteration as stop:
            return out, stop.value


def test_generate_returns_the_state_after_prompt_and_completion(engine):
    prompt = tokens(21)
    out, final = _run(engine.generate(prompt, engine.new_state(), SamplingParams(max_tokens=13, temperature=0)))
    assert len(out) == 13 and final.tokens_seen == 21 + 13
    logits, replayed = engine.forward(torch.cat([prompt, torch.tensor(out)]), engine.new_state())
    # greedy: every generated token is the argmax after the tokens before it
    assert logits[20:-1].argmax(-1).tolist() == out
    for name, t in replayed.tensors.items():
        assert_close(final.tensors[name], t)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=7)
    a, _ = _run(engine.generate(tokens(5), engine.new_state(), params))
    prompt = tokens(5)
    a, _ = _run(engine.generate(prompt, engine.new_state(), params))
    b, _ = _run(engine.generate(prompt, engine.new_state(), params))
    c, _ = _run(engine.generate(prompt, engine.new_state(), SamplingParams(max_tokens=20, temperature=1.0, seed=8)))
    assert a == b and a != c


def test_top_k_one_is_greedy_and_top_p_restricts_the_support(engine):
    prompt = tokens(9)
    greedy, _ = _run(engine.generate(prompt, engine.new_state(), SamplingParams(max_tokens=8, temperature=0)))
    top1, _ = _run(engine.generate(prompt, engine.new_state(), SamplingParams(max_tokens=8, top_k=1, seed=3)))
    tiny_p, _ = _run(engine.generate(prompt, engine.new_state(), SamplingParams(max_tokens=8, top_p=1e-6, seed=4)))
    assert greedy == top1 == tiny_p


def test_stop_strings_and_completion(engine):
    prompt = engine.tokenizer.encode("hello")
    free = engine.complete(prompt, engine.new_state(), SamplingParams(max_tokens=30, temperature=0))
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop = engine.tokenizer.decode(free.token_ids[10:12])
    done = engine.complete(prompt, engine.new_state(), SamplingParams(max_tokens=30, temperature=0, stop=(stop,)))
    assert done.finish_reason == "stop"
    assert stop not in done.text and free.text.startswith(done.text)
    assert len(done.token_ids) <= 12
    assert done.state.tokens_seen == len(prompt) + len(done.token_ids)


def test_eos_ends_generation():
    eng = engine_for(tiny("lmm"))
    first = eng.complete([1, 2, 3], eng.new_state(), SamplingParams(max_tokens=5, temperature=0)).token_ids[2]
    model = Titans(tiny("lmm", eos_token_id=first))
    model.load_state_dict(eng.model.state_dict())
    with_eos = Engine(model, device=torch.device("cpu"))
    out = with_eos.complete([1, 2, 3], with_eos.new_state(), SamplingParams(max_tokens=5, temperature=0))
    assert out.finish_reason == "stop" and out.token_ids[-1] == first and len(out.token_ids) <= 3
    assert out.text == with_eos.tokenizer.decode(out.token_ids[:-1])  # the EOS token has no text


def test_token_ids_as_list_or_tensor_and_invalid_ids(engine):
    ids = tokens(12)
    a, _ = engine.forward(ids, engine.new_state())
    b, _ = engine.forward(ids.tolist(), engine.new_state())
    assert torch.equal(a, b)
    empty, same = engine.forward([], engine.new_state())
    assert empty.shape == (0, engine.config.vocab_size) and same.tokens_seen == 0
    for bad in ([256], [-1], [[1, 2], [3, 4]], torch.zeros(2, 2, dtype=torch.long), torch.tensor([300])):
        with pytest.raises(ValueError):
            engine.forward(bad, engine.new_state())
    with pytest.raises(ValueError, match="at least one prompt token"):
        next(engine.generate([], engine.new_state()))
    # a decode step of one id per session (made into one tensor) is the same as ids given as tensors
    states = [engine.forward(tokens(n), engine.new_state())[1] for n in (3, 8)]
    listed = engine.forward_batch([[5], [7]], states)
    tensors = engine.forward_batch([torch.tensor([5]), torch.tensor([7])], states)
    assert all(torch.equal(a[0], b[0]) and a[1].tokens_seen == b[1].tokens_seen for a, b in zip(listed, tensors))
    for bad in ([[5], [256]], [[5], [-1]]):
        with pytest.raises(ValueError):
            engine.forward_batch(bad, states)


def test_state_of_another_engine_is_refused(engine):
    other = engine_for(tiny("mac"), seed=9)
    with pytest.raises(ValueError, match="another model"):
        engine.forward([1], other.new_state())


def test_surprise_is_per_token_and_falls_when_text_repeats(engine):
    text = tokens(48)
    logits, _, surprise = engine.forward(torch.cat([text, text, text]), engine.new_state(), return_surprise=True)
    assert surprise.shape == (144,) and (surprise >= 0).all()
    # the memory learned the first pass: keys/values seen before are predicted better the next time
    assert surprise[96:].mean() < surprise[:48].mean()


def test_checkpoint_round_trip(tmp_path):
    eng = engine_for(tiny("mal"))
    eng.save(tmp_path / "m")
    loaded = Engine.load(tmp_path / "m", device="cpu")
    assert loaded.fingerprint == eng.fingerprint and loaded.config == eng.config
    ids = tokens(30)
    assert torch.equal(loaded.forward(ids, loaded.new_state())[0], eng.forward(ids, eng.new_state())[0])
    # a snapshot made by one loads into the other: same model
    blob = eng.forward(ids, eng.new_state())[1].to_bytes()
    assert loaded.load_state(blob).tokens_seen == 30


def test_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    from engine import ConfigError

    eng = engine_for(tiny("mal"))
    eng.save(tmp_path)
    tiny("mal", n_layers=3).save(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="missing"):
        Engine.load(tmp_path)
    tiny("mal", ffn_hidden=64).save(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="shape"):
        Engine.load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        Engine.load(tmp_path)


def test_tokenizers_json_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the memory of a titan remembers the past"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    vocab = tok.get_vocab_size()
    cfg = tiny("lmm", tokenizer="tokenizers", vocab_size=vocab)
    tok.save(str(tmp_path / "tokenizer.json"))
    Engine.from_config(cfg, device="cpu", tokenizer_dir=tmp_path).save(tmp_path)
    eng = Engine.load(tmp_path, device="cpu")
    ids = eng.tokenizer.encode("the titan remembers")
    assert 0 < len(ids) < len("the titan remembers") and max(ids) < vocab
    assert eng.tokenizer.decode(ids).replace(" ", "") == "thetitanremembers"
    out = eng.complete(ids, eng.new_state(), SamplingParams(max_tokens=4, temperature=0))
    assert len(out.token_ids) == 4 and all(0 <= t < vocab for t in out.token_ids)
    eng.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").exists()
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Engine.load(tmp_path)


def test_half_precision_linear_is_one_function_whatever_the_rows():
    """Linear with fp16 weights runs few rows as an fp16 GEMM and many as an fp32 GEMM on the upcast weight
    (much faster on CPUs); both round input and output to fp16, so they agree to fp16 rounding (two units in the
    last place at most: the sums are accumulated in different orders)."""
    from engine.quant import Linear

    torch.manual_seed(0)
    layer = Linear(64, 96).to(torch.float16)
    x = torch.randn(3 * Linear.UPCAST_ROWS, 64)
    together = layer(x)  # upcast path
    one_by_one = torch.cat([layer(row[None]) for row in x])  # half path
    assert together.dtype == one_by_one.dtype == torch.float32
    ulp = torch.finfo(torch.float16).eps * together.abs().clamp(min=2.0**-14)
    assert ((together - one_by_one).abs() <= 2 * ulp).all()
    assert torch.equal(together.half().float(), together)  # rounded to fp16, as the half path is


def test_int8_linear_is_one_function_whatever_the_rows():
    """Linear.quantize_int8: few rows take torch's int8 x bf16 kernel, many a float GEMM on the int8 weight; both
    are a bf16 linear on the dequantised weight, so they agree to bf16 rounding, and stay near the float layer."""
    torch.manual_seed(0)
    full = Linear(64, 96)
    layer = Linear(64, 96)
    layer.load_state_dict(full.state_dict())
    assert layer.quantize_int8() and layer.weight.dtype == torch.int8
    x = torch.randn(3 * Linear.UPCAST_ROWS, 64)
    together = layer(x)  # float GEMM
    one_by_one = torch.cat([layer(row[None]) for row in x])  # the int8 kernel
    assert together.dtype == one_by_one.dtype == torch.float32
    without_bias = together - layer.bias
    ulp = torch.finfo(torch.bfloat16).eps * without_bias.abs().clamp(min=2.0**-14)
    assert ((together - one_by_one).abs() <= 2 * ulp).all()
    reference = full(x)
    assert (together - reference).norm() / reference.norm() < 0.02  # int8 rows: ~0.5% per product
    assert not Linear(40, 8).quantize_int8()  # widths the kernel cannot take stay float


@pytest.mark.parametrize("variant", ["mac", "mal"])
@pytest.mark.parametrize(("dtype", "step_tol", "fp32_tol"), [(torch.float16, 2e-2, 5e-2), (torch.int8, 5e-2, 1e-1)])
def test_reduced_weights_keep_the_invariants_to_their_rounding(variant, dtype, step_tol, fp32_tol):
    cfg = tiny(variant)
    reduced, full = engine_for(cfg, weight_dtype=dtype), engine_for(cfg)
    ids = tokens(50, torch.Generator().manual_seed(4))
    prefill, state = reduced.forward(ids, reduced.new_state())
    stepped, s = [], reduced.new_state()
    for t in ids:
        logits, s = reduced.forward([int(t)], s)
        stepped.append(logits)
    assert_close(torch.cat(stepped), prefill, tol=step_tol)
    assert_close(prefill, full.forward(ids, full.new_state())[0], tol=fp32_tol)  # the same model as in fp32
    assert reduced.fingerprint != full.fingerprint


def test_an_int8_engine_quantises_every_dense_layer_and_is_not_saved_as_a_model(tmp_path):
    int8 = engine_for(tiny("mac"), weight_dtype=torch.int8)
    assert all(m.weight.dtype == torch.int8 for m in int8.model.modules() if isinstance(m, Linear))
    assert int8.fingerprint != engine_for(tiny("mac"), weight_dtype=torch.float16).fingerprint
    with pytest.raises(ValueError, match="int8"):  # a checkpoint holds the float model; quantising is at load time
        int8.save(tmp_path)
