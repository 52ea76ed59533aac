"""exo-upstream: serve models by forwarding whole requests to OpenAI-compatible servers.

Registers the `upstream` engine. The engine module (aiohttp, click) is imported only when a
hook runs, never when exo lists plugins.
"""

from exo_core import hookimpl


@hookimpl
def register_engines(register):
    from exo_upstream.engine import UpstreamEngine

    register(UpstreamEngine)
