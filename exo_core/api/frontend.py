"""Registers the built-in OpenAI-compatible frontend."""

from exo_core.hookspecs import hookimpl


@hookimpl
def register_frontends(register):
    pass  # filled in by the API issue
