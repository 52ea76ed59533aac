"""Hook specifications: the points where plugins extend exo."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("exo")
hookimpl = HookimplMarker("exo")


@hookspec
def register_engines(register):
    """Register inference engine classes: register(EngineClass)."""


@hookspec
def register_discovery(register):
    """Register peer discovery classes by name: register(name, DiscoveryClass)."""


@hookspec
def register_partitioners(register):
    """Register partitioning strategies by name: register(name, function)."""


@hookspec
def register_frontends(register):
    """Register API frontends the node starts: register(name, FrontendClass)."""


@hookspec
def register_models(register):
    """Register model cards: register(ModelCard)."""


@hookspec
def register_commands(cli):
    """Add extra subcommands to the `exo` click group."""
