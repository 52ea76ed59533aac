"""`GET /v1/downloads`: what each node of the cluster is downloading or has downloaded."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from exo_core.api.state import ApiState
from exo_core.models.progress import TRACKER


def routes(state: ApiState) -> list[web.RouteDef]:
    """The downloads routes of the API app serving `state`."""

    async def list_downloads(request: web.Request) -> web.Response:
        """This node's downloads (`data`, oldest first: model, repo, file, layers, source, bytes
        done of total, status, error, bytes per second) and every node's (`nodes`, this one
        first; `?cluster=0` leaves the peers out)."""
        from exo_core.networking.file_transfer import cluster_downloads

        node = state.node
        own = [d.to_dict() for d in TRACKER.snapshot()]
        nodes: list[dict[str, Any]]
        if request.query.get("cluster", "1") in ("0", "false", "no"):
            nodes = [{"node_id": node.node_id, "data": own}]
        else:
            nodes = await cluster_downloads(node)
        active = sum(1 for n in nodes for d in n["data"] if d["status"] == "downloading")
        return web.json_response(
            {"object": "list", "node_id": node.node_id, "active": active, "data": own, "nodes": nodes}
        )

    return [web.get("/v1/downloads", list_downloads)]
