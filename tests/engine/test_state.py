"""Snapshots: fixed size whatever the context length; foreign, corrupted or tampered ones are refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from engine import SnapshotError
from engine.state import FORMAT_VERSION, MAX_STATE_MAGNITUDE, MAX_TOKENS_SEEN, _checksum, read_snapshot

from .helpers import VARIANTS, assert_close, engine_for, tiny, tokens


@pytest.fixture(scope="module")
def engine():
    return engine_for(tiny("mac"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_snapshot_size_is_independent_of_context_length(variant):
    eng = engine_for(tiny(variant))
    _, after_100 = eng.forward(tokens(100), eng.new_state())
    _, after_10k = eng.forward(tokens(10_000), eng.new_state())
    blob_100, blob_10k = after_100.to_bytes(), after_10k.to_bytes()
    assert after_10k.tokens_seen == 10_000
    assert len(blob_100) == len(blob_10k) == len(eng.new_state().to_bytes())
    restored = eng.load_state(blob_10k)
    for name, t in after_10k.tensors.items():
        assert torch.equal(restored.tensors[name], t)
    assert all(torch.isfinite(t).all() for t in after_10k.tensors.values())


def test_snapshot_metadata(engine):
    state = engine.forward(tokens(9), engine.new_state())[1]
    blob = state.to_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["model_fingerprint"] == engine.fingerprint
    assert int(meta["tokens_seen"]) == 9
    assert float(meta["created_at"]) > 1.7e9
    assert engine.load_state(blob).tokens_seen == 9


def test_snapshots_are_safetensors_files(engine, tmp_path):
    """Written by our own writer: safetensors itself must read back the same tensors and metadata."""
    from safetensors import safe_open
    from safetensors.torch import load

    state = engine.forward(tokens(11), engine.new_state())[1]
    odd = {"a.half": torch.randn(3, 5).half(), "b.bf16": torch.randn(7).bfloat16(), "c.int": torch.arange(5),
           "d.scalar": torch.tensor(2.5), "e.flag": torch.tensor([True, False, True])}
    for tensors in (state.tensors, {**state.tensors, **odd}):
        blob = type(state)(tensors, 11, engine.fingerprint).to_bytes()
        read = load(blob)
        assert set(read) == set(tensors)
        assert all(read[k].dtype == t.dtype and torch.equal(read[k], t) for k, t in tensors.items())
        (tmp_path / "s.safetensors").write_bytes(blob)
        with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
            assert int(f.metadata()["tokens_seen"]) == 11


def test_foreign_snapshot_is_refused(engine):
    other_weights = engine_for(tiny("mac"), seed=1)  # same config, other weights
    other_config = engine_for(tiny("mac", n_persistent=3))
    for other in (other_weights, other_config):
        blob = other.forward(tokens(5), other.new_state())[1].to_bytes()
        with pytest.raises(SnapshotError, match="another model"):
            engine.load_state(blob)


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0x01]) + blob[index + 1 :]


def test_corrupted_snapshots_are_refused(engine):
    blob = engine.forward(tokens(30), engine.new_state())[1].to_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    bad = [
        b"", b"garbage", blob[:7], blob[:100], blob[: len(blob) // 2], blob + b"x",
        b"\xff" * 8 + blob[8:],  # absurd header length
        _flip(blob, 8 + n + 17), _flip(blob, len(blob) - 1),  # bit flips in the tensor data
        _flip(blob, 12),  # bit flip in the header JSON
    ]
    for corrupted in bad:
        with pytest.raises(SnapshotError):
            engine.load_state(corrupted)
    with pytest.raises(SnapshotError):
        engine.load_state("not bytes")  # type: ignore[arg-type]


def _rewrite_header(blob: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + blob[8 + n :]


def test_tampered_metadata_is_refused(engine):
    blob = engine.forward(tokens(30), engine.new_state())[1].to_bytes()
    edits = {
        "format_version": lambda h: h["__metadata__"].update(format_version="999"),
        "checksum": lambda h: h["__metadata__"].update(content_sha256="0" * 64),
        "no metadata": lambda h: h.pop("__metadata__"),
        "tokens_seen": lambda h: h["__metadata__"].update(tokens_seen="many"),
        "negative tokens": lambda h: h["__metadata__"].update(tokens_seen="-4"),
    }
    for name, edit in edits.items():
        with pytest.raises(SnapshotError):
            engine.load_state(_rewrite_header(blob, edit))
        assert name


def test_snapshot_with_wrong_tensor_layout_is_refused(engine):
    from safetensors.torch import save

    state = engine.new_state()
    tensors = dict(state.tensors)
    name = next(iter(tensors))
    for broken in ({**tensors, name: tensors[name][..., :1].contiguous()},  # wrong shape
                   {k: v for k, v in tensors.items() if k != name},  # missing tensor
                   {**tensors, name: tensors[name].double()},  # wrong dtype
                   {**tensors, name: torch.full_like(tensors[name], float("nan"))}):  # non-finite
        forged = type(state)(broken, 0, engine.fingerprint)
        with pytest.raises(SnapshotError):
            engine.load_state(forged.to_bytes())
    assert save(tensors)  # the unbroken set serialises fine


def test_non_finite_or_extreme_values_anywhere_are_refused_and_values_at_the_bound_load(engine):
    # a snapshot is untrusted input: finite weights near float32's limit (3e38) made a session's surprise inf and
    # its sampling fail; a model's own states hold tens
    state = engine.new_state()
    names = sorted(state.tensors)
    for name, value, what in [(names[0], float("nan"), "non-finite"), (names[-1], float("inf"), "non-finite"),
                              (names[len(names) // 2], -float("inf"), "non-finite"),
                              (names[1], 3e38, "values beyond"), (names[2], -2 * MAX_STATE_MAGNITUDE, "values beyond")]:
        broken = {**state.tensors, name: state.tensors[name].clone()}
        broken[name].view(-1)[-1] = value
        blob = type(state)(broken, 0, engine.fingerprint).to_bytes()
        with pytest.raises(SnapshotError, match=f"{name} holds {what}"):
            read_snapshot(blob, engine.fingerprint, state.tensors, untrusted=True)
        if what == "values beyond":  # a session's own state is bounded only by float32
            assert engine.load_state(blob).tensors[name].view(-1)[-1] == value
        else:
            with pytest.raises(SnapshotError, match=f"{name} holds {what}"):
                engine.load_state(blob)
    for sign in (1, -1):
        at_bound = {k: torch.full_like(v, sign * MAX_STATE_MAGNITUDE) if v.is_floating_point() else v
                    for k, v in state.tensors.items()}
        loaded = read_snapshot(type(state)(at_bound, 0, engine.fingerprint).to_bytes(), engine.fingerprint,
                               state.tensors, untrusted=True)
        assert all(torch.equal(loaded.tensors[k], at_bound[k]) for k in at_bound)
        logits, after = engine.forward(tokens(40), loaded)  # the model's products stay finite there
        assert torch.isfinite(logits).all() and all(torch.isfinite(t).all() for t in after.tensors.values())


def test_a_re_signed_snapshot_is_bounded_in_every_field(engine):
    # the checksum has no key, so anyone can re-sign a snapshot: tokens_seen = 2**63 - 10 overflowed the
    # positions a few steps later and failed every session batched with it
    state = engine.forward(tokens(9), engine.new_state())[1]
    for tokens_seen in (2**63 - 10, MAX_TOKENS_SEEN + 1):
        with pytest.raises(SnapshotError, match="tokens_seen"):
            engine.load_state(type(state)(state.tensors, tokens_seen, engine.fingerprint).to_bytes())
    far = engine.load_state(type(state)(state.tensors, MAX_TOKENS_SEEN - 5, engine.fingerprint).to_bytes())
    logits, after = engine.forward(tokens(20), far)
    assert after.tokens_seen == MAX_TOKENS_SEEN + 15 and torch.isfinite(logits).all()

    def re_signed(edit) -> bytes:
        def edit_and_sign(header):
            edit(header["__metadata__"])
            meta = header["__metadata__"]
            (n,) = struct.unpack("<Q", blob[:8])
            meta["content_sha256"] = _checksum(meta, blob[8 + n:])
        return _rewrite_header(blob, edit_and_sign)

    blob = state.to_bytes()
    assert engine.load_state(re_signed(lambda meta: None)).tokens_seen == 9  # re-signing alone is fine
    for edit, match in [(lambda m: m.update(note="x" * 100_000), "header is"),  # 100 KB of junk kept in the store
                        (lambda m: m.update(note="x"), "metadata holds"),
                        (lambda m: m.update(created_at="inf"), "created_at"),
                        (lambda m: m.update(model_fingerprint=engine.fingerprint + " " * 200), "at most 128")]:
        with pytest.raises(SnapshotError, match=match):
            engine.load_state(re_signed(edit))


def test_restored_state_continues_identically(engine):
    ids = tokens(40)
    full, _ = engine.forward(ids, engine.new_state())
    _, mid = engine.forward(ids[:23], engine.new_state())
    rest, _ = engine.forward(ids[23:], engine.load_state(mid.to_bytes()))
    assert_close(rest, full[23:])
