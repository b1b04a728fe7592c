"""Request bodies at the HTTP boundary (OpenAI fields as vLLM accepts them, plus the session extensions).

Unknown fields are ignored, as vLLM does; known OpenAI fields the server does not implement are refused.
Validation errors become 400 with the OpenAI error envelope.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields this server does not implement, with the values that ask for nothing: a request that sets one to
# anything else is refused with 400 rather than answered as if it had been honoured
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}), "best_of": (None, 1),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "suffix": (None, ""),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off (vLLM)")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    session_id: str | None = None
    memory: Literal["commit", "discard"] = "commit"
    return_surprise: bool = False
    return_token_ids: bool = False  # vLLM's extension: the sampled token ids in each choice
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if data.get(name) not in neutral:
                    raise ValueError(f"{name} is not supported by this server (omit it, or send "
                                     f"{' or '.join(json.dumps(v) for v in neutral)})")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 8 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 8 non-empty strings of at most 256 characters")
        return stops

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int, extra_stops: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(0, self.top_k), seed=self.seed, stop=self.stops() + extra_stops)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(..., description="text, or token ids")
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts carry meaning for this model
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    name: str | None = None
    metadata: dict[str, str] | None = None


class SessionFork(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    metadata: dict[str, str] | None = None


class SessionRollback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1)


class SessionMemorize(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., min_length=1)
