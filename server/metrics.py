"""Prometheus metrics: vLLM's semantics and buckets under a `titans_` prefix, plus session metrics (DESIGN §5).

Labels are static (model_name, and a few small enums); a session id is never a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
BYTES_BUCKETS = tuple(2.0**k for k in range(10, 31, 2))  # 1 KiB .. 1 GiB
SURPRISE_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def token_buckets(limit: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to `limit`."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class Metrics:
    def __init__(self, model_name: str, max_tokens: int):
        self.registry = CollectorRegistry()
        r, label = self.registry, {"model_name": model_name}

        def counter(name, doc, labels=()):
            return Counter(name, doc, ["model_name", *labels], registry=r)

        def histogram(name, doc, buckets, labels=()):
            return Histogram(name, doc, ["model_name", *labels], buckets=buckets, registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, ["model_name"], registry=r).labels(**label)

        self.running = gauge("titans_num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("titans_num_requests_waiting", "Requests waiting to join the batch.")
        self.sessions_active = gauge("titans_sessions_active", "Sessions whose memory is in the running batch.")
        self.snapshot_cache_bytes = gauge("titans_snapshot_cache_bytes", "Snapshot bytes this replica keeps in "
                                          "memory (--blob-cache-bytes at most; a remote store only).")
        self.prompt_tokens = counter("titans_prompt_tokens", "Prompt tokens read.").labels(**label)
        self.generation_tokens = counter("titans_generation_tokens", "Tokens generated.").labels(**label)
        self._success = counter("titans_request_success", "Finished requests.", ["finished_reason"])
        self.ttft = histogram("titans_time_to_first_token_seconds", "Time to first token.",
                              TTFT_BUCKETS).labels(**label)
        self.itl = histogram("titans_inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS).labels(**label)
        self.e2e = histogram("titans_e2e_request_latency_seconds", "Request latency.", REQUEST_BUCKETS).labels(**label)
        self.queue_time = histogram("titans_request_queue_time_seconds", "Time waiting for the batch.",
                                    REQUEST_BUCKETS).labels(**label)
        self.prefill_time = histogram("titans_request_prefill_time_seconds", "In the engine: joining the batch to "
                                      "the first token.", REQUEST_BUCKETS).labels(**label)
        self.decode_time = histogram("titans_request_decode_time_seconds", "In the engine: the first token to the "
                                     "end.", REQUEST_BUCKETS).labels(**label)
        self.inference_time = histogram("titans_request_inference_time_seconds", "In the engine: joining the batch "
                                        "to the end (prefill + decode).", REQUEST_BUCKETS).labels(**label)
        self.request_prompt_tokens = histogram("titans_request_prompt_tokens", "Prompt tokens per request.",
                                               token_buckets(max_tokens)).labels(**label)
        self.request_generation_tokens = histogram("titans_request_generation_tokens", "Tokens per request.",
                                                   token_buckets(max_tokens)).labels(**label)
        self._sessions = counter("titans_sessions", "Session operations.", ["op"])
        self.memory_load = histogram("titans_memory_load_seconds", "Lease + read of a session snapshot.",
                                     TTFT_BUCKETS).labels(**label)
        self.memory_save = histogram("titans_memory_save_seconds", "Snapshot encode.",
                                     TTFT_BUCKETS).labels(**label)
        self.state_bytes = histogram("titans_memory_state_bytes", "Snapshot size.", BYTES_BUCKETS).labels(**label)
        self.surprise = histogram("titans_memory_surprise", "Mean surprise of a request's tokens.",
                                  SURPRISE_BUCKETS).labels(**label)
        self.conflicts = counter("titans_session_conflicts", "Requests refused because the session was busy "
                                 "or had moved on (409).").labels(**label)
        self._rejected = counter("titans_rejected_requests", "Requests refused before any work, by reason "
                                 "(queue_full, requests_per_minute, tokens_per_minute, sessions_per_tenant).",
                                 ["reason"])
        self.engine_restarts = counter("titans_engine_restarts", "Engine processes started again after one "
                                       "died.").labels(**label)
        self._store_errors = counter("titans_store_errors", "Store calls that failed (store unreachable).", ["op"])
        self.model_name = model_name

    def finished(self, prompt_tokens: int, generation_tokens: int, seconds: float, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        self.e2e.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def engine_times(self, prefill_s: float, inference_s: float) -> None:
        """vLLM's split of a finished request's time in the engine (e2e adds the queue and the API's own work)."""
        self.prefill_time.observe(prefill_s)
        self.decode_time.observe(inference_s - prefill_s)
        self.inference_time.observe(inference_s)

    def request_failed(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def session_op(self, op: str) -> None:
        self._sessions.labels(self.model_name, op).inc()

    def store_error(self, op: str) -> None:
        self._store_errors.labels(self.model_name, op).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()
