"""exo-tinygrad: a Llama-family engine on tinygrad. tinygrad is imported lazily (on load)."""

from exo_core import hookimpl


@hookimpl
def register_engines(register):
    from exo_tinygrad.engine import TinygradEngine

    register(TinygradEngine)
