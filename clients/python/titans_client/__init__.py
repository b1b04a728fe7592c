"""Python client for Titans Server: completions and chat over sessions with a persistent neural memory."""

from ._core import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    StreamError,
    TitansError,
    chunk_text,
)
from ._ops import Memorized, Session
from .client import AsyncClient, Client

__all__ = ["AsyncClient", "AuthenticationError", "BadRequestError", "Client", "ConflictError", "Memorized",
           "NotFoundError", "RateLimitError", "RetryPolicy", "ServerError", "ServiceUnavailableError", "Session",
           "StreamError", "TitansError", "chunk_text"]
