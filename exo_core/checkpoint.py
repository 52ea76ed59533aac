"""Public: the checkpoint readers engines build on (GGUF, safetensors, Llama-family config, tensor names).

`from exo_core.checkpoint import read_gguf, LlamaConfig, ...`; see `exo_core.models.checkpoint`.
"""

from exo_core.models.checkpoint import *  # noqa: F403
from exo_core.models.checkpoint import __all__ as __all__
