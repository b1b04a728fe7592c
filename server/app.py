"""The FastAPI application: routers, error envelope, the gate (API key and body size, before the body is read),
and a lifespan that loads the model and opens the store without blocking /health (/ready answers 503 until both
are up)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from server.deps import tenant_of
from server.engine_process import EngineClient, EngineOptions, freeze_garbage_collector, pin_this_process, plan_cpus
from server.errors import APIError, error_response, install_handlers
from server.metrics import Metrics
from server.quotas import Quotas
from server.routers import docs, generation, health, models, playground, sessions
from server.runtime import Runtime
from server.settings import Settings
from server.store import StoreLimits, StoreOptions, open_store, redact_url

log = logging.getLogger("titans.server")


def load_runtime(settings: Settings) -> Runtime:
    """Start the engine process (it loads and warms up the model); this process keeps only what it needs of the
    model (config, tokenizer, fingerprint, a fresh state: ModelInfo), never its weights."""
    torch.set_num_threads(1)
    name = settings.model_name()
    metrics = Metrics(name, max(settings.max_prompt_tokens, settings.max_output_tokens))
    cpus = plan_cpus(settings.engine_cpus, settings.torch_threads)
    core = EngineClient(EngineOptions(str(settings.model), settings.device, settings.weights, settings.compile,
                                      settings.aot_decode, cpus.threads, settings.max_running,
                                      settings.prefill_chunk, cpus.engine, settings.stream_interval_ms / 1000,
                                      settings.decode_graphs),
                        metrics, settings.max_waiting)
    core.start()
    pin_this_process(cpus.api)
    log.info("%s", cpus.describe())
    try:
        store = open_store(settings.store, StoreOptions(
            history=settings.history, ttl_s=settings.session_ttl_s, timeout_s=settings.store_timeout_s,
            cache_bytes=settings.blob_cache_bytes,
            limits=StoreLimits(max_snapshot_bytes=settings.max_body_bytes,
                               max_sessions_per_tenant=settings.max_sessions_per_tenant)))
    except BaseException:
        core.stop()
        raise
    return Runtime(settings, core.model, store, core, metrics, name, created=int(time.time()),
                   state_bytes=len(core.model.new_state().to_bytes()),
                   quotas=Quotas(settings.requests_per_minute, settings.tokens_per_minute))


IMPORT_PATH = "/v1/sessions/import"
PUBLIC_PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/docs", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/",)  # the assets of the public pages (/, /docs)


class Gate:
    """What a request must pass before any of its body is read: its API key (401 without a valid one, on every
    route but the public probes and docs), its tenant's requests-per-minute quota (429), then its body's size
    (413): `import_limit` for snapshot imports, `json_limit` for every other route. The body is read here, up to
    its limit, and handed on whole, so no handler (nor FastAPI's JSON parser) ever holds more than the limit, and
    a caller without a key costs no read at all."""

    def __init__(self, app, tenants_by_key: dict[str, str], json_limit: int, import_limit: int):
        self.app, self.keys = app, tenants_by_key
        self.json_limit, self.import_limit = json_limit, import_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        try:
            if path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
                tenant = tenant_of(headers.get(b"authorization", b"").decode("latin-1") or None, self.keys)
                runtime = scope["app"].state.runtime
                if runtime is not None:
                    runtime.admit(tenant, "requests_per_minute")
            limit = self.import_limit if path == IMPORT_PATH else self.json_limit
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                raise APIError(413, f"request body of {int(declared)} bytes exceeds this route's limit of {limit}",
                               "body_too_large")
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client left before its request was whole
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    raise APIError(413, f"request body exceeds this route's limit of {limit} bytes",
                                   "body_too_large")
        except APIError as e:
            return await error_response(e)(scope, receive, send)
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}

        async def replay():  # the body once, then what the client sends next (its disconnect)
            nonlocal whole
            if whole is None:
                return await receive()
            message, whole = whole, None
            return message

        await self.app(scope, replay, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = await asyncio.to_thread(load_runtime, settings)
        rt.core.attach(asyncio.get_running_loop())
        freeze_garbage_collector()  # every stream waits while the event loop collects
        app.state.runtime = rt
        keys = "no API keys: the server is open, one tenant" if not app.state.tenants_by_key else \
            f"{len(app.state.tenants_by_key)} API key(s)"
        log.info("serving %s (%s, fingerprint %s) with store %s; %s", rt.model_name, rt.model.config.variant,
                 rt.model.fingerprint, redact_url(settings.store), keys)
        supervisor = asyncio.create_task(rt.keep_engine_alive())
        try:
            yield
        finally:
            supervisor.cancel()
            app.state.runtime = None
            rt.core.stop()
            await rt.store.close()

    app = FastAPI(title="Titans Server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible completions over per-session neural long-term memory.")
    app.state.runtime = None
    app.state.tenants_by_key = settings.tenants_by_key()
    install_handlers(app)

    app.add_middleware(Gate, tenants_by_key=app.state.tenants_by_key, json_limit=settings.max_json_body_bytes,
                       import_limit=settings.max_body_bytes)
    for module in (generation, sessions, models, health, docs, playground):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=docs.STATIC), name="static")
    return app
