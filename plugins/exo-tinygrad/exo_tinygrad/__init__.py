"""exo-tinygrad: a Llama-family engine on tinygrad. tinygrad is imported lazily."""

from exo_core.hookspecs import hookimpl


@hookimpl
def register_engines(register):
    pass  # the engine lands with its own issue
