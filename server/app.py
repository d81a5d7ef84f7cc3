"""The FastAPI application: wiring, liveness/readiness, metrics and the model list."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.engine import Engine
from server import chat, completions, tokenizer_api
from server.async_engine import AsyncEngine
from server.auth import BearerAuth
from server.context import ServerConfig, ServerContext, get_context
from server.errors import install_error_handlers
from server.limits import BodyLimit
from server.metrics import ServerMetrics
from server.openapi import ModelCard, ModelList, ProbeStatus, errors, install_openapi
from server.tokens import TokenText


def _model_card(ctx: ServerContext, model_id: str) -> dict[str, Any]:
    engine = ctx.engine
    return {
        "id": model_id,
        "object": "model",
        "created": ctx.created,
        "owned_by": "specserve",
        "root": ctx.config.aliases[0] if ctx.config.aliases else model_id,
        "parent": None,
        "max_model_len": engine.max_len,
        "speculative_decoding": {
            "draft_model": ctx.config.draft_name,
            "num_speculative_tokens": engine.gamma,
        },
    }


def _add_ops_routes(app: FastAPI) -> None:
    probe = {200: {"model": ProbeStatus}, 503: {"model": ProbeStatus, "description": "Not up"}}

    @app.get("/health", response_model=None, responses=probe)
    async def health(request: Request) -> JSONResponse:
        core = get_context(request).core
        if core.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": core.error or "stopped"}, 503)

    @app.get("/ready", response_model=None, responses=probe)
    async def ready(request: Request) -> JSONResponse:
        core = get_context(request).core
        if core.ready:
            return JSONResponse({"status": "ready"})
        status = "warming up" if core.alive else (core.error or "stopped")
        return JSONResponse({"status": status}, 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text format"}},
    )
    async def metrics(request: Request) -> Response:
        registry = get_context(request).metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=errors(401))
    async def list_models(request: Request) -> dict[str, Any]:
        ctx = get_context(request)
        return {"object": "list", "data": [_model_card(ctx, ctx.config.model_name)]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=errors(401, 404))
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        ctx = get_context(request)
        return _model_card(ctx, ctx.check_model(model_id))


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """An app serving ``engine``; the engine thread starts (and warms up) with the app's
    lifespan, and /ready turns 200 once warm-up is done."""
    metrics = ServerMetrics(engine)
    core = AsyncEngine(engine, config.max_queue, metrics)
    context = ServerContext(
        engine=engine, config=config, core=core, metrics=metrics, tokens=TokenText(engine.tokenizer)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        core.start()
        try:
            yield
        finally:
            await core.stop()

    app = FastAPI(title="specserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.context = context
    install_error_handlers(app)
    install_openapi(app, context)
    _add_ops_routes(app)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenizer_api.router)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    # Added last, so outermost: a request without the key is refused before its body is read.
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    return app
