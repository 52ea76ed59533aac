"""Registers the built-in discovery modules (udp, manual)."""

from exo_core.hookspecs import hookimpl
from exo_core.networking.manual import ManualDiscovery
from exo_core.networking.udp import UDPDiscovery


@hookimpl
def register_discovery(register):
    register("udp", UDPDiscovery)
    register("manual", ManualDiscovery)
