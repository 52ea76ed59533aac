"""exo-rkllm: a bridge to an RKLLAMA server driving the RK3588 NPU.

Registers the `rkllm` engine (the default on an RK3588) and the model cards it serves. The
engine module (aiohttp, click) is imported only when a hook runs, never when exo lists plugins.
"""

from exo_core import hookimpl


@hookimpl
def register_engines(register):
    from exo_rkllm.engine import RKLLMEngine

    register(RKLLMEngine)


@hookimpl
def register_models(register):
    from exo_rkllm.models import RKLLM_CARDS

    for card in RKLLM_CARDS:
        register(card)
