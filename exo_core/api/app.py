"""The API's aiohttp application: routes, the error and auth middlewares, and the small handlers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from exo_core import __version__
from exo_core.api import admission, downloads, ollama, protocol
from exo_core.api.completions import CompletionRun
from exo_core.api.metrics import CONTENT_TYPE
from exo_core.api.protocol import APIError
from exo_core.api.state import STATE, ApiState, model_not_found, read_json
from exo_core.models import files
from exo_core.node.node import Node
from exo_core.node.partitioning import NoPlanError
from exo_core.runtime import Runtime

STATIC_DIR = Path(__file__).parent / "static"


def _endpoint(request: web.Request) -> str:
    """The route's pattern (bounded label values for metrics), or 'unmatched'."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    state = request.app[STATE]
    endpoint = _endpoint(request)
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        state.metrics.requests.labels(endpoint, "499").inc()  # the client went away (nginx's code)
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error_response(state.api_error(_routing_error(request, exc), endpoint), request.path)
    except Exception as exc:
        response = _error_response(state.api_error(exc, endpoint), request.path)
    state.metrics.requests.labels(endpoint, str(response.status)).inc()
    return response


def _routing_error(request: web.Request, exc: web.HTTPException) -> BaseException:
    """Unknown paths and wrong methods, said in words a client author can act on."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return APIError(405, f"{request.method} is not allowed on {request.path}; use {allowed}")
    if isinstance(exc, web.HTTPNotFound) and request.match_info.route.resource is None:
        if request.path.startswith("/api/"):
            return APIError(
                404,
                f"There is no {request.path}: exo serves Ollama's /api/chat, /api/generate, /api/tags, "
                "/api/show, /api/ps and /api/version (no pulls, embeddings or model management)",
                type="not_found_error",
            )
        return APIError(
            404,
            f"There is no {request.path}: the API is under /v1 (/v1/chat/completions, /v1/completions, "
            "/v1/models), the chat page at /",
            type="not_found_error",
        )
    return exc


def _error_response(error: APIError, path: str = "") -> web.Response:
    """OpenAI's error shape, or Ollama's under /api/."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    if getattr(error, "retry_after", None) is not None:
        headers = {"Retry-After": str(error.retry_after)}  # type: ignore[attr-defined]
    body = ollama.error_body(error) if path.startswith("/api/") else error.body()
    return web.json_response(body, status=error.status, headers=headers)


def _needs_key(path: str) -> bool:
    return path.startswith(("/v1/", "/api/")) or path == "/metrics"


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """With an API key set, /v1/*, /api/* and /metrics need `Authorization: Bearer <key>`."""
    key = request.app[STATE].runtime.config.api_key
    if key and _needs_key(request.path):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(
                401,
                "This node needs an API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")
    return await handler(request)


def _cross_origin(request: web.Request) -> str | None:
    """The browser origin of a request from another site's page (None: no browser, or this API's page)."""
    origin = request.headers.get("Origin")
    if not origin or origin == f"{request.scheme}://{request.host}":
        return None
    return origin


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Let pages on the origins given with --cors-origin read the API's answers (the key still guards it)."""
    origin = _cross_origin(request)
    if origin is not None and origin in request.app[STATE].runtime.config.cors_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"


@web.middleware
async def preflight_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse other sites' pages unless --cors-origin allows them; answer their CORS preflights.

    A browser sends some cross-site requests without asking first, so refusing only the
    preflight would still let any page the user visits drive the API.
    """
    origin = _cross_origin(request)
    if origin is None:
        return await handler(request)
    if origin not in request.app[STATE].runtime.config.cors_origins:
        return _error_response(
            APIError(
                403,
                f"This API does not take requests from pages on {origin}; start exo with "
                f"--cors-origin {origin} to allow that site",
                type="permission_error",
            )
        )
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Max-Age": "600",
            },
        )
    return await handler(request)


# ---- handlers ----------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = protocol.parse_chat_request(await read_json(request))
    return await _run(request, req, "/v1/chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    req = protocol.parse_completion_request(await read_json(request))
    return await _run(request, req, "/v1/completions")


async def _run(
    request: web.Request, req: protocol.ChatRequest | protocol.CompletionRequest, endpoint: str
) -> web.StreamResponse:
    state = request.app[STATE]
    return await CompletionRun(state, req, endpoint).respond(request)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    objects = await asyncio.to_thread(_model_objects, state, *_model_servers(state))
    return web.json_response({"object": "list", "data": objects})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card = await state.resolve_model(request.match_info["model_id"])
    objects = await asyncio.to_thread(_model_objects, state, *_model_servers(state), card.id)
    if not objects:
        raise model_not_found(f"The model {card.id!r} is known, but no node in this cluster can serve it now")
    return web.json_response(objects[0])


def _model_servers(state: ApiState) -> tuple[dict[str, list[str]], set[str]]:
    """Which nodes serve each model, and the models loaded here: read on the event loop, where
    the peer table and the engine change (a worker thread would race them)."""
    return state.servers_by_model(), _loaded_model_ids(state.node)


def _model_objects(
    state: ApiState, servers: dict[str, list[str]], loaded: set[str], only: str | None = None
) -> list[dict[str, Any]]:
    """The models the cluster can serve now, the default model first (on a thread: it reads files)."""
    default = state.runtime.default_model.id
    out = []
    for model_id in sorted(servers, key=lambda m: (m != default, m)):
        if only is not None and model_id != only:
            continue
        card = state.node.models[model_id]
        downloaded = any(files.files_present(card).values())
        out.append(
            protocol.model_object(
                card, state.created, loaded=model_id in loaded, downloaded=downloaded, nodes=servers[model_id]
            )
        )
    return out


def _loaded_model_ids(node: Node) -> set[str]:
    """Models this node's engine holds weights of now."""
    return {shard.model_id for shard in node.engine.loaded_shards}


async def topology(request: web.Request) -> web.Response:
    """Nodes, their capabilities, and the layers each would hold of a model (?model=, else the default)."""
    state = request.app[STATE]
    model_id = request.query.get("model")
    card = await state.resolve_model(model_id) if model_id else state.runtime.default_model
    node = state.node
    try:
        plan = node.make_plan(card)
        error = None
    except NoPlanError as exc:
        plan, error = (), str(exc)
    shards = {stage.node_id: stage.shard.to_dict() for stage in plan}
    nodes = [
        {**info.to_dict(), "self": info.node_id == node.node_id, "shard": shards.get(info.node_id)}
        for info in node.cluster()
    ]
    return web.json_response(
        {
            "node_id": node.node_id,
            "model": card.id,
            "nodes": nodes,
            "plan": [stage.to_dict() for stage in plan],
            "error": error,
        }
    )


async def healthcheck(request: web.Request) -> web.Response:
    state = request.app[STATE]
    node = state.node
    stage = node.stage
    problem = stage.broken or (
        None if stage.healthy else f"the engine has made no progress for {stage.stuck_for:.0f} s"
    )
    body: dict[str, Any] = {
        "status": "ok" if problem is None else "unhealthy",
        "node_id": node.node_id,
        "peers": len(node.peers),
        "engine": node.engine.name,
        "version": __version__,
        "uptime_s": round(time.time() - state.created, 1),
    }
    if problem is not None:
        body["problem"] = problem
    return web.json_response(body, status=200 if problem is None else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    response = web.Response(body=state.metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _warm_up(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[STATE].warm_up())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def init(runtime: Runtime) -> web.Application:
    """The API app for a started runtime."""
    app = web.Application(
        middlewares=[
            preflight_middleware,
            error_middleware,
            auth_middleware,
            admission.middleware(admission.Admission(runtime.config.max_concurrent_requests)),
        ],
        client_max_size=protocol.MAX_BODY_BYTES,
    )
    state = ApiState(runtime)
    state.metrics.count_replans(lambda: state.node.origin.replans_total)
    app[STATE] = state
    app.cleanup_ctx.append(_warm_up)
    app.on_response_prepare.append(_cors_headers)
    app.add_routes(
        [
            web.get("/", index),
            web.static("/static", STATIC_DIR),
            web.get("/healthcheck", healthcheck),
            web.get("/metrics", metrics),
            web.get("/v1/models", list_models),
            web.get("/v1/models/{model_id:.+}", get_model),
            web.post("/v1/chat/completions", chat_completions),
            web.post("/v1/completions", completions),
            web.get("/v1/topology", topology),
            *ollama.ROUTES,
            *downloads.routes(state),
        ]
    )
    return app
