"""Server settings: every option is a `titans serve` flag and a TITANS_* environment variable (pydantic-settings)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "titans-mal-recall"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TITANS_", frozen=True)

    model: Path = Field(DEFAULT_MODEL, description="model directory (config.json + model.safetensors)")
    served_model_name: str | None = Field(None, description="the model id clients send; default: directory name")
    store: str = Field("sqlite:///./data/sessions.db", description="sqlite:///path.db or redis://host:port/db")
    host: str = "127.0.0.1"
    port: int = 8000
    keep_alive_s: float = Field(75.0, gt=0, description="how long an idle client connection is kept open: longer than "
                                                        "clients keep pooled connections (httpx and the openai SDK: "
                                                        "5 s), so a client never sends a request on a connection the "
                                                        "server is closing (it would see a reset it cannot retry)")
    # "KEY" or "KEY:TENANT", comma-separated in TITANS_API_KEYS; a key without a tenant is its own tenant
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    api_keys_file: Path | None = Field(None, description="a file of API keys, one KEY[:TENANT] a line ('#' "
                                                         "comments): keys kept out of the process list and the "
                                                         "environment (a mounted secret)")
    device: str = Field("auto", description="auto | cpu | cuda")
    weights: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "fp32", description="dtype of the dense projections: fp16 halves the bytes of every decode step, int8 "
                            "(weight-only, a scale per row) quarters them; part of the model fingerprint, so "
                            "snapshots do not move between servers that differ in it")
    compile: bool = Field(False, description="torch.compile the decode step and prefill's memory chunks (a "
                                             "faster decode on a CPU, needs a C++ compiler); compiled at start-up, "
                                             "before /ready")
    aot_decode: bool = Field(False, description="with compile: also compile one session's decode step ahead of "
                                                 "time (AOTInductor; a faster single-session decode on a CPU, "
                                                 "tens of seconds more at start-up)")
    decode_graphs: Literal["auto", "cuda", "off"] = Field(
        "auto", description="cuda: decode steps replayed from CUDA graphs captured at bucketed batch sizes; off (and "
                            "auto, until a GPU run has checked the capture) steps them as any other call")
    torch_threads: int = Field(0, ge=0, description="CPU threads of the engine process; 0: all cores but one, "
                                                     "which is left to the HTTP process")
    engine_cpus: str = Field("none", pattern=r"^(auto|none|\d+(-\d+)?(,\d+(-\d+)?)*)$",
                             description="CPUs of the engine process (Linux): none = not pinned; auto = the last "
                                         "torch_threads of those this server may use, the HTTP process keeping the "
                                         "rest, so neither preempts the other; or a list such as 2-7,9")

    stream_interval_ms: float = Field(0.0, ge=0, le=1000, description="hold streamed tokens until this long since the "
                                      "engine last sent any (each send wakes the HTTP process): fewer, larger SSE "
                                      "chunks; a request's first and last tokens never wait")

    engine_restart_delay_s: float = Field(1.0, ge=0, description="wait before starting a new engine process when "
                                                                 "one dies (doubled after each failed start, up "
                                                                 "to 30 s)")
    engine_restarts: int = Field(5, ge=1, description="failed engine starts in a row after which the server exits "
                                                      "(for a restart policy to act)")

    max_prompt_tokens: int = Field(16384, gt=0)
    max_output_tokens: int = Field(4096, gt=0)
    default_max_tokens: int = Field(256, gt=0, description="max_tokens of a chat completion that names none (at most "
                                                           "max_output_tokens): a reply the model never ends stops "
                                                           "there instead of filling the session's memory")
    max_waiting: int = Field(256, ge=0, description="queued requests beyond this get 429")
    max_running: int = Field(32, gt=0, description="sessions decoding together in one batch")
    prefill_chunk: int = Field(512, gt=0, description="prompt tokens a session reads per engine step")
    max_body_bytes: int = Field(64 * 2**20, gt=0, description="snapshot imports (raw bytes)")
    max_json_body_bytes: int = Field(2 * 2**20, gt=0, description="bodies of every other route (JSON: a prompt of "
                                                                    "max_prompt_tokens token ids fits many times)")

    max_sessions_per_tenant: int = Field(0, ge=0, description="sessions one tenant may keep (0: no limit); "
                                                              "enforced by the store, across replicas")
    requests_per_minute: int = Field(0, ge=0, description="requests per tenant per minute, in each replica "
                                                          "(0: no limit)")
    tokens_per_minute: int = Field(0, ge=0, description="prompt tokens plus max_tokens per tenant per minute, in "
                                                        "each replica (0: no limit)")

    lease_ttl_s: float = Field(6.0, gt=0, description="a request's hold on its session, renewed every third of it "
                                                      "while the request runs: a holder that dies frees its session "
                                                      "this soon")
    session_ttl_s: float | None = Field(None, gt=0, description="sliding expiry of idle sessions (off by default)")
    history: int = Field(3, ge=0, description="older versions kept per session for rollback")
    store_timeout_s: float = Field(2.0, gt=0)
    blob_cache_bytes: int = Field(256 * 2**20, ge=0, description="snapshots a Redis-backed replica keeps in "
                                                                 "memory: loading a version it wrote or read skips "
                                                                 "the transfer")

    @model_validator(mode="after")
    def _aot_decode_needs_compile(self):
        if self.aot_decode and not self.compile:
            raise ValueError("aot_decode needs compile (--compile true)")
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    def tenants_by_key(self) -> dict[str, str]:
        """key -> tenant. A key without a tenant gets one derived from a hash of it (the key itself is never stored)."""
        keys = {}
        entries = list(self.api_keys)
        if self.api_keys_file is not None:
            lines = (line.split("#", 1)[0].strip() for line in Path(self.api_keys_file).read_text().splitlines())
            entries += [line for line in lines if line]
        for entry in entries:
            key, _, tenant = entry.partition(":")
            keys[key] = tenant or "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return keys

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name
