"""Titans Server: OpenAI-compatible serving of Titans models with per-session neural memory (DESIGN §5)."""
