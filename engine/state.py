"""SessionState and its snapshot bytes (DESIGN.md §3).

A snapshot is a safetensors file: the state's tensors, and in the header metadata
    format_version, model_fingerprint, tokens_seen, created_at, content_sha256
where content_sha256 covers the other metadata fields and the tensor bytes, so a flipped bit anywhere
is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from torch import Tensor

FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 1 << 20
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


def _split(blob: bytes) -> tuple[dict, memoryview]:
    if len(blob) < 8:
        raise SnapshotError("snapshot is truncated (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise SnapshotError("snapshot header length is invalid (truncated or not a snapshot)")
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SnapshotError("snapshot header is not valid JSON (corrupted or not a snapshot)") from None
    if not isinstance(header, dict):
        raise SnapshotError("snapshot header is not a JSON object")
    return header, memoryview(blob)[8 + header_len :]


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether no element is NaN or infinite, in one reduction: a float64 sum of half- or single-precision
    values cannot overflow (|x| < 3.5e38, far fewer than 1e269 elements), and a NaN or an infinity makes it
    non-finite. One reduction instead of two small ops per tensor, which were the largest part of loading a small
    model's snapshot."""
    if any(t.dtype == torch.float64 for t in tensors):  # a float64 sum of float64 values can overflow
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    return not tensors or bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors]).sum(dtype=torch.float64)))


def read_snapshot(blob: bytes, fingerprint: str, template: dict[str, Tensor]) -> SessionState:
    """Parse and verify a snapshot against this model's fingerprint and state layout."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"a snapshot must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    header, data = _split(blob)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise SnapshotError("snapshot has no metadata: not a Titans session snapshot")
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
    if tokens_seen < 0:
        raise SnapshotError(f"snapshot tokens_seen {tokens_seen} is negative")
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
    if not _all_finite([t for t in tensors.values() if t.is_floating_point()]):
        bad = next(k for k, t in sorted(tensors.items()) if t.is_floating_point() and not torch.isfinite(t).all())
        raise SnapshotError(f"snapshot tensor {bad} holds non-finite values")
    tensors = {k: v.to(template[k].device) for k, v in tensors.items()}
    return SessionState(tensors, tokens_seen, fingerprint, created_at)
