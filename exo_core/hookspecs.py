"""Hook specifications: the points where plugins extend exo.

Every hook is called once, with a `register` callback (or the click group); what a plugin
registers is checked against its protocol, and a wrong registration is reported as that
plugin's error (`exo plugins`) instead of stopping exo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:
    import click

    from exo_core.discovery import Discovery
    from exo_core.engine import InferenceEngine
    from exo_core.frontend import Frontend
    from exo_core.models.cards import ModelCard
    from exo_core.node.partitioning import Partitioner

hookspec = HookspecMarker("exo")
hookimpl = HookimplMarker("exo")


@hookspec
def register_engines(register: Callable[[type[InferenceEngine]], None]) -> None:
    """Register inference engine classes: register(EngineClass) (a subclass of InferenceEngine)."""


@hookspec
def register_discovery(register: Callable[[str, type[Discovery]], None]) -> None:
    """Register peer discovery classes by name: register(name, DiscoveryClass) (a subclass of Discovery)."""


@hookspec
def register_partitioners(register: Callable[[str, Partitioner], None]) -> None:
    """Register partitioning strategies by name: register(name, function(nodes, model_id, n_layers))."""


@hookspec
def register_frontends(register: Callable[[str, type[Frontend]], None]) -> None:
    """Register API frontends the node starts: register(name, FrontendClass) (see exo_core.Frontend)."""


@hookspec
def register_models(register: Callable[[ModelCard], None]) -> None:
    """Register model cards: register(ModelCard)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add extra subcommands to the `exo` click group."""
