"""exo-discovery-tailscale: find peers through the Tailscale API."""

from exo_core import hookimpl


@hookimpl
def register_discovery(register):
    from exo_discovery_tailscale.discovery import TailscaleDiscovery

    register("tailscale", TailscaleDiscovery)
