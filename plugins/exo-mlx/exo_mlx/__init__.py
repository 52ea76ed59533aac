"""exo-mlx: a Llama-family engine on MLX. mlx is imported lazily."""

from exo_core.hookspecs import hookimpl


@hookimpl
def register_engines(register):
    pass  # the engine lands with its own issue
