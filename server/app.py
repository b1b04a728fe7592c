"""The FastAPI application: routers, error envelope, body limit, and a lifespan that loads the model and opens the
store without blocking /health (/ready answers 503 until both are up)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from engine import Engine
from server.errors import error_body, install_handlers
from server.metrics import Metrics
from server.routers import generation, health, models, sessions
from server.runtime import Runtime
from server.scheduler import Scheduler
from server.settings import Settings
from server.store import StoreLimits, StoreOptions, open_store

log = logging.getLogger("titans.server")


def load_runtime(settings: Settings) -> Runtime:
    device = None if settings.device == "auto" else torch.device(settings.device)
    engine = Engine.load(settings.model, device=device)
    store = open_store(settings.store, StoreOptions(
        history=settings.history, ttl_s=settings.session_ttl_s, timeout_s=settings.store_timeout_s,
        limits=StoreLimits(max_snapshot_bytes=settings.max_body_bytes)))
    name = settings.model_name()
    metrics = Metrics(name, max(settings.max_prompt_tokens, settings.max_output_tokens))
    scheduler = Scheduler(engine, settings.max_running, settings.max_waiting, settings.prefill_chunk, metrics)
    return Runtime(settings, engine, store, scheduler, metrics, name, created=int(time.time()),
                   state_bytes=len(engine.new_state().to_bytes()))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = await asyncio.to_thread(load_runtime, settings)
        rt.scheduler.start()
        app.state.runtime = rt
        keys = "no API keys: the server is open, one tenant" if not app.state.tenants_by_key else \
            f"{len(app.state.tenants_by_key)} API key(s)"
        log.info("serving %s (%s, fingerprint %s) with store %s; %s", rt.model_name, rt.engine.config.variant,
                 rt.engine.fingerprint, settings.store, keys)
        try:
            yield
        finally:
            app.state.runtime = None
            rt.scheduler.stop()
            await rt.store.close()

    app = FastAPI(title="Titans Server", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions over per-session neural long-term memory.")
    app.state.runtime = None
    app.state.tenants_by_key = settings.tenants_by_key()
    install_handlers(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > settings.max_body_bytes:
            return JSONResponse(error_body(413, f"request body of {size} bytes exceeds the limit of "
                                                f"{settings.max_body_bytes}", "body_too_large"), status_code=413)
        return await call_next(request)

    for module in (generation, sessions, models, health):
        app.include_router(module.router)
    return app
