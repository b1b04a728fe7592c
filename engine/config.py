"""ModelConfig: the one description of a Titans model, frozen, validated once, stored as config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VARIANTS = ("lmm", "mac", "mag", "mal")
TOKENIZERS = ("byte", "tokenizers")


class ConfigError(ValueError):
    """A config.json (or preset) that does not describe a valid model."""


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "mac"  # lmm | mac | mag | mal (DESIGN.md §2.6)
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8  # attention heads; head_dim = dim // n_heads
    ffn_hidden: int = 1024  # SwiGLU hidden width

    # neural memory (DESIGN.md §2.1-2.5)
    mem_heads: int = 8  # memory is per head, width mem_head_dim = dim // mem_heads
    mem_depth: int = 2  # L_M >= 1
    mem_expansion: int = 4  # hidden width of the memory MLP = mem_expansion * mem_head_dim
    chunk_size: int = 16  # b: gradients of a chunk are taken at the chunk-start weights
    conv_kernel: int = 4
    # SiLU on q and k before their l2 norm, as v1 §4.4 has it; False: l2 only (NeurIPS §3.3 drops the SiLU), which
    # leaves keys free of the positive part all SiLU outputs share (reads of different keys then interfere less)
    qk_silu: bool = True
    theta_max: float = 1.0  # inner learning rate ceiling: theta = theta_max * sigmoid(.)
    mem_grad_clip: float | None = None  # per-token bound on the inner gradient norm (None = off)
    theta_bias_init: float = -2.0  # sigmoid(-2) ~ 0.12: small learning rate at init
    eta_bias_init: float = 2.2  # sigmoid(2.2) ~ 0.9: momentum
    alpha_bias_init: float = -6.0  # sigmoid(-6) ~ 0.0025: almost no forgetting

    # attention (mac: segment, mag/mal: sliding window)
    segment_size: int = 128  # C, mac only
    window: int = 128  # W, mag/mal only
    n_persistent: int = 4  # N_p learned key/value rows per attention layer
    rope_base: float = 10000.0

    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    tokenizer: str = "byte"  # byte | tokenizers (tokenizer.json in the model directory)
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        errors = list(self._errors())
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(errors))

    def _errors(self):
        if self.variant not in VARIANTS:
            yield f"variant must be one of {VARIANTS}, got {self.variant!r}"
        if self.tokenizer not in TOKENIZERS:
            yield f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}"
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "mem_heads",
                     "mem_depth", "mem_expansion", "chunk_size", "conv_kernel", "segment_size", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                yield f"{name} must be a positive integer, got {value!r}"
        if self.n_persistent < 0:
            yield f"n_persistent must be >= 0, got {self.n_persistent}"
        heads_ok = isinstance(self.dim, int) and isinstance(self.n_heads, int) and self.n_heads > 0
        if heads_ok and (self.dim % self.n_heads or (self.dim // self.n_heads) % 2):
            yield f"dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of even width"
        if isinstance(self.mem_heads, int) and self.mem_heads > 0 and self.dim % self.mem_heads:
            yield f"dim ({self.dim}) must be divisible by mem_heads ({self.mem_heads})"
        if self.variant == "mac" and self.segment_size % self.chunk_size:
            yield f"segment_size ({self.segment_size}) must be a multiple of chunk_size ({self.chunk_size})"
        if self.variant in ("mag", "mal") and self.window < self.chunk_size:
            yield f"window ({self.window}) must be >= chunk_size ({self.chunk_size})"
        if not isinstance(self.qk_silu, bool):
            yield f"qk_silu must be true or false, got {self.qk_silu!r}"
        if not self.theta_max > 0:
            yield f"theta_max must be > 0, got {self.theta_max}"
        if self.mem_grad_clip is not None and not self.mem_grad_clip > 0:
            yield f"mem_grad_clip must be > 0 or null, got {self.mem_grad_clip}"
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            yield f"eos_token_id {self.eos_token_id} outside the vocabulary"
        if self.tokenizer == "byte" and self.vocab_size < 256:
            yield f"the byte tokenizer needs vocab_size >= 256, got {self.vocab_size}"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def mem_head_dim(self) -> int:
        return self.dim // self.mem_heads

    @property
    def attention_span(self) -> int:
        """Tokens one attention layer can see back: the MAC segment or the sliding window (0 for lmm)."""
        return {"lmm": 0, "mac": self.segment_size, "mag": self.window, "mal": self.window}[self.variant]

    # config.json round trip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no model config at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])


# Tiny presets: < 1M parameters, memory depth 2, and chunk/segment/window small enough that a few
# hundred tokens cross several of each. small-mac is the ~8M benchmark model.
_TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_hidden=128, mem_heads=4, mem_depth=2,
             mem_expansion=2, chunk_size=4, segment_size=16, window=16, n_persistent=2)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-lmm": dict(_TINY, variant="lmm"),
    "tiny-mac": dict(_TINY, variant="mac"),
    "tiny-mag": dict(_TINY, variant="mag"),
    "tiny-mal": dict(_TINY, variant="mal"),
    "small-mac": dict(variant="mac", vocab_size=256, dim=256, n_layers=4, n_heads=8, ffn_hidden=1536,
                      mem_heads=8, mem_depth=2, mem_expansion=4, chunk_size=16, segment_size=128,
                      n_persistent=4),
}
