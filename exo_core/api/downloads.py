"""`GET /v1/downloads`: what this node is downloading or has downloaded, and how far each got."""

from __future__ import annotations

from aiohttp import web

from exo_core.models.progress import TRACKER


async def list_downloads(request: web.Request) -> web.Response:
    """This node's downloads, oldest first: model, repo, file, layers, bytes done of total,
    status (downloading, done, failed), error, bytes per second."""
    from exo_core.api.app import STATE  # app imports this module's routes

    node = request.app[STATE].node
    downloads = [d.to_dict() for d in TRACKER.snapshot()]
    active = sum(1 for d in downloads if d["status"] == "downloading")
    return web.json_response({"object": "list", "node_id": node.node_id, "active": active, "data": downloads})


ROUTES = [web.get("/v1/downloads", list_downloads)]
