"""exo-mlx: a Llama-family engine on MLX. mlx is imported lazily, never by this module."""

from exo_core import hookimpl


@hookimpl
def register_engines(register):
    from exo_mlx.engine import MLXEngine

    register(MLXEngine)
