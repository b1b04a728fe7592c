"""SessionState and its snapshot bytes (DESIGN.md §3).

A snapshot is a safetensors file: the state's tensors, and in the header metadata
    format_version, model_fingerprint, tokens_seen, created_at, content_sha256
where content_sha256 covers the other metadata fields and the tensor bytes, so a flipped bit anywhere
is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from torch import Tensor

State = dict[str, Tensor]  # one mixer's state
ModelState = list[list[State]]  # [layer][mixer]


def nest_state(flat: State) -> ModelState:
    """Mixer dicts in name order, whichever order the flat dict came in (a snapshot's, the template's): compiled
    decode guards on the order of their keys."""
    layers: dict[int, dict[int, State]] = {}
    for key, value in sorted(flat.items()):
        _, layer, mixer, name = key.split(".", 3)
        layers.setdefault(int(layer), {}).setdefault(int(mixer[1:]), {})[name] = value
    return [[mixers[j] for j in sorted(mixers)] for _, mixers in sorted(layers.items())]


def flatten_state(nested: ModelState) -> State:
    return {f"layers.{i}.m{j}.{k}": v for i, mixers in enumerate(nested) for j, st in enumerate(mixers)
            for k, v in st.items()}


def write_into(state: ModelState, new: ModelState) -> None:
    """Copy into `state`'s tensors those of `new` that a step made afresh rather than writing in place."""
    for old_layer, new_layer in zip(state, new):
        for old, replaced in zip(old_layer, new_layer):
            for name, value in replaced.items():
                if value is not old[name]:
                    old[name].copy_(value)


FORMAT_VERSION = "1"
# A snapshot is untrusted input (anyone can re-sign one: the checksum has no key), so every field is bounded.
# tokens_seen: positions stay far inside int64 whatever a session reads next (2**48 tokens: ~9,000 years at a
# million tokens a second).
MAX_TOKENS_SEEN = 1 << 48
# |x| of every float in an imported state: a model's own states hold tens after 50 KB of text, and a state that
# holds this everywhere, of one sign, still steps to finite values (tests/engine/test_state.py); near float32's
# limit (3e38) the memory's products overflow. Checked on import only: a session's own state is never refused.
MAX_STATE_MAGNITUDE = 1e4
# the header: a few hundred bytes per tensor entry and the metadata below, nothing else
HEADER_BYTES_PER_TENSOR = 512
MAX_METADATA_VALUE = 128
# safetensors' names of the dtypes a state may hold
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


class SnapshotError(ValueError):
    """A snapshot that cannot be loaded into this model: corrupted, foreign, or of another format."""


@dataclass(frozen=True)
class SessionState:
    """Everything one session needs to continue; fixed in size whatever the context length.

    tensors: name -> unbatched tensor (memory weights W, momentum S, chunk buffers, conv tails,
    attention rings, MAC segment-start weights). tokens_seen: the session's position.
    Treat as immutable: the engine never writes into these tensors.
    """

    tensors: dict[str, Tensor]
    tokens_seen: int
    model_fingerprint: str
    created_at: float = field(default_factory=time.time)

    @classmethod
    def fresh(cls, template: dict[str, Tensor], fingerprint: str) -> SessionState:
        """A new session: copies of a model's initial state tensors, nothing read yet."""
        return cls({k: v.clone() for k, v in template.items()}, 0, fingerprint)

    def to_bytes(self) -> bytes:
        """The safetensors file, written here rather than by safetensors.torch.save, whose Python side (a copy
        per tensor, then parsing its own header back to add the checksum) took twice as long for a snapshot of
        a dozen small tensors: its write is on every committed request's path, in the engine loop."""
        names = sorted(self.tensors)
        tensors = [self.tensors[k].detach().to("cpu").contiguous() for k in names]
        header: dict = {}
        offset = 0
        for name, t in zip(names, tensors):
            size = t.numel() * t.element_size()
            header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        data = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]).numpy().tobytes() if tensors else b""
        meta = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": self.model_fingerprint,
            # fixed-width numbers: the snapshot's byte length never depends on how far the session got
            "tokens_seen": f"{self.tokens_seen:020d}",
            "created_at": f"{self.created_at:020.6f}",
        }
        header["__metadata__"] = {**meta, "content_sha256": _checksum(meta, data)}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors keeps the data section 8-byte aligned
        return struct.pack("<Q", len(encoded)) + encoded + data

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_CHECKED = ("format_version", "model_fingerprint", "tokens_seen", "created_at")


def _checksum(meta: dict, data: bytes) -> str:
    """sha256 over the metadata fields and the tensor bytes: a change to either is detected."""
    h = hashlib.sha256()
    for key in _CHECKED:
        h.update(f"{key}={meta.get(key)!s}\n".encode())
    h.update(data)
    return h.hexdigest()


def _split(blob: bytes, max_header: int) -> tuple[dict, memoryview]:
    if len(blob) < 8:
        raise SnapshotError("snapshot is truncated (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > max_header:
        raise SnapshotError(f"snapshot header is {header_len} bytes, more than this model's states need "
                            f"({max_header})")
    if 8 + header_len > len(blob):
        raise SnapshotError("snapshot header length is invalid (truncated or not a snapshot)")
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SnapshotError("snapshot header is not valid JSON (corrupted or not a snapshot)") from None
    if not isinstance(header, dict):
        raise SnapshotError("snapshot header is not a JSON object")
    return header, memoryview(blob)[8 + header_len :]


def _largest_magnitude(tensors: list[Tensor]) -> float:
    """max |x| over the tensors' elements, in one reduction over their concatenation (NaN if any element is NaN,
    which max propagates): one op instead of two per tensor, which were the largest part of loading a small
    model's snapshot."""
    if not tensors:
        return 0.0
    return float(torch.cat([t.reshape(-1).float() for t in tensors]).abs().max())


def read_snapshot(blob: bytes, fingerprint: str, template: dict[str, Tensor], untrusted: bool = False) -> SessionState:
    """Parse and verify a snapshot against this model's fingerprint and state layout; an untrusted one (an
    import) also has its values bounded by MAX_STATE_MAGNITUDE."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"a snapshot must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    header, data = _split(blob, HEADER_BYTES_PER_TENSOR * (len(template) + 1))
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise SnapshotError("snapshot has no metadata: not a Titans session snapshot")
    if set(meta) != {*_CHECKED, "content_sha256"}:
        raise SnapshotError(f"snapshot metadata holds {sorted(meta)[:8]}, expected {[*_CHECKED, 'content_sha256']}")
    if not all(isinstance(v, str) and len(v) <= MAX_METADATA_VALUE for v in meta.values()):
        raise SnapshotError(f"snapshot metadata values must be strings of at most {MAX_METADATA_VALUE} characters")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    theirs = meta.get("model_fingerprint")
    if theirs != fingerprint:
        raise SnapshotError(f"snapshot belongs to another model (fingerprint {theirs!r}, this model {fingerprint!r})")
    if _checksum(meta, data) != meta.get("content_sha256"):
        raise SnapshotError("snapshot content does not match its checksum (corrupted)")
    try:
        tokens_seen = int(meta["tokens_seen"])
        created_at = float(meta["created_at"])
    except (KeyError, ValueError):
        raise SnapshotError("snapshot metadata tokens_seen/created_at missing or malformed") from None
    if not 0 <= tokens_seen <= MAX_TOKENS_SEEN:
        raise SnapshotError(f"snapshot tokens_seen {tokens_seen} is outside [0, {MAX_TOKENS_SEEN}]")
    if not math.isfinite(created_at):
        raise SnapshotError(f"snapshot created_at {created_at} is not a finite time")
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise SnapshotError(f"snapshot tensors cannot be read: {e}") from None
    if set(tensors) != set(template):
        missing, extra = sorted(set(template) - set(tensors)), sorted(set(tensors) - set(template))
        raise SnapshotError(f"snapshot tensors do not match this model (missing {missing[:3]}, extra {extra[:3]})")
    for name, ref in template.items():
        t = tensors[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise SnapshotError(f"snapshot tensor {name} is {tuple(t.shape)} {t.dtype}, "
                                f"expected {tuple(ref.shape)} {ref.dtype}")
    floats = {k: t for k, t in sorted(tensors.items()) if t.is_floating_point() and t.numel()}
    bound = MAX_STATE_MAGNITUDE if untrusted else torch.finfo(torch.float64).max
    if not _largest_magnitude(list(floats.values())) <= bound:  # NaN and infinities too
        bad, worst = next((k, m) for k, m in ((k, _largest_magnitude([t])) for k, t in floats.items())
                          if not m <= bound)
        what = "non-finite values" if not math.isfinite(worst) else f"values beyond {bound:g}"
        raise SnapshotError(f"snapshot tensor {bad} holds {what}, which no model state reaches")
    tensors = {k: v.to(template[k].device) for k, v in tensors.items()}
    return SessionState(tensors, tokens_seen, fingerprint, created_at)
