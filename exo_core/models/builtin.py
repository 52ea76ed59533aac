"""The built-in model cards: the embedded default and the Llama-family models people ask for."""

from exo_core.hookspecs import hookimpl
from exo_core.models.cards import EMBEDDED, ModelCard


def _card(id, name, n_layers, *, gguf=None, hf=None, mlx=None, aliases=(), ctx=None):
    sources = {k: v for k, v in (("gguf", gguf), ("safetensors", hf), ("mlx", mlx)) if v}
    return ModelCard(id, name, n_layers, sources, context_length=ctx, aliases=aliases)


BUILTIN_CARDS = (
    _card(
        "smollm2-135m",
        "SmolLM2 135M Instruct (embedded, Q4_1)",
        30,
        gguf=EMBEDDED,
        hf="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("SmolLM2-135M-Instruct",),
        ctx=8192,
    ),
    _card(
        "smollm2-360m",
        "SmolLM2 360M Instruct",
        32,
        gguf="HuggingFaceTB/SmolLM2-360M-Instruct-GGUF:smollm2-360m-instruct-q8_0.gguf",
        hf="HuggingFaceTB/SmolLM2-360M-Instruct",
        mlx="mlx-community/SmolLM2-360M-Instruct",
        ctx=8192,
    ),
    _card(
        "smollm2-1.7b",
        "SmolLM2 1.7B Instruct",
        24,
        gguf="HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF:smollm2-1.7b-instruct-q4_k_m.gguf",
        hf="HuggingFaceTB/SmolLM2-1.7B-Instruct",
        mlx="mlx-community/SmolLM2-1.7B-Instruct-4bit",
        ctx=8192,
    ),
    _card(
        "llama-3.2-1b",
        "Llama 3.2 1B Instruct",
        16,
        gguf="bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        hf="unsloth/Llama-3.2-1B-Instruct",
        mlx="mlx-community/Llama-3.2-1B-Instruct-4bit",
        ctx=131072,
    ),
    _card(
        "llama-3.2-3b",
        "Llama 3.2 3B Instruct",
        28,
        gguf="bartowski/Llama-3.2-3B-Instruct-GGUF:Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        hf="unsloth/Llama-3.2-3B-Instruct",
        mlx="mlx-community/Llama-3.2-3B-Instruct-4bit",
        ctx=131072,
    ),
    _card(
        "llama-3.1-8b",
        "Llama 3.1 8B Instruct",
        32,
        gguf="bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
        hf="unsloth/Meta-Llama-3.1-8B-Instruct",
        mlx="mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
        ctx=131072,
    ),
    _card(
        "llama-3.1-70b",
        "Llama 3.1 70B Instruct",
        80,
        gguf="bartowski/Meta-Llama-3.1-70B-Instruct-GGUF:Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf",
        hf="unsloth/Meta-Llama-3.1-70B-Instruct",
        mlx="mlx-community/Meta-Llama-3.1-70B-Instruct-4bit",
        ctx=131072,
    ),
    _card(
        "qwen-2.5-0.5b",
        "Qwen 2.5 0.5B Instruct",
        24,
        gguf="Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf",
        hf="Qwen/Qwen2.5-0.5B-Instruct",
        mlx="mlx-community/Qwen2.5-0.5B-Instruct-4bit",
        ctx=32768,
    ),
    _card(
        "qwen-2.5-1.5b",
        "Qwen 2.5 1.5B Instruct",
        28,
        gguf="Qwen/Qwen2.5-1.5B-Instruct-GGUF:qwen2.5-1.5b-instruct-q4_k_m.gguf",
        hf="Qwen/Qwen2.5-1.5B-Instruct",
        mlx="mlx-community/Qwen2.5-1.5B-Instruct-4bit",
        ctx=32768,
    ),
    _card(
        "qwen-2.5-3b",
        "Qwen 2.5 3B Instruct",
        36,
        gguf="Qwen/Qwen2.5-3B-Instruct-GGUF:qwen2.5-3b-instruct-q4_k_m.gguf",
        hf="Qwen/Qwen2.5-3B-Instruct",
        mlx="mlx-community/Qwen2.5-3B-Instruct-4bit",
        ctx=32768,
    ),
    _card(
        "qwen-2.5-7b",
        "Qwen 2.5 7B Instruct",
        28,
        gguf="Qwen/Qwen2.5-7B-Instruct-GGUF:qwen2.5-7b-instruct-q4_k_m.gguf",
        hf="Qwen/Qwen2.5-7B-Instruct",
        mlx="mlx-community/Qwen2.5-7B-Instruct-4bit",
        ctx=32768,
    ),
)


@hookimpl
def register_models(register):
    for card in BUILTIN_CARDS:
        register(card)
