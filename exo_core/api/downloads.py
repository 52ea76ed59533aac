"""`GET /v1/downloads`: what this node is downloading or has downloaded, and how far each got."""

from __future__ import annotations

from aiohttp import web

from exo_core.api.state import ApiState
from exo_core.models.progress import TRACKER


def routes(state: ApiState) -> list[web.RouteDef]:
    """The downloads routes of the API app serving `state`."""

    async def list_downloads(request: web.Request) -> web.Response:
        """This node's downloads, oldest first: model, repo, file, layers, source, bytes done of
        total, status (downloading, done, failed), error, bytes per second."""
        downloads = [d.to_dict() for d in TRACKER.snapshot()]
        active = sum(1 for d in downloads if d["status"] == "downloading")
        return web.json_response(
            {"object": "list", "node_id": state.node.node_id, "active": active, "data": downloads}
        )

    return [web.get("/v1/downloads", list_downloads)]
