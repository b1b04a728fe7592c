"""Titans engine: models with a neural long-term memory, run on explicit per-session state."""

from .config import ConfigError, ModelConfig
from .engine import Completion, Engine
from .sampling import SamplingParams
from .state import SessionState, SnapshotError

__all__ = ["Completion", "ConfigError", "Engine", "ModelConfig", "SamplingParams", "SessionState", "SnapshotError"]
