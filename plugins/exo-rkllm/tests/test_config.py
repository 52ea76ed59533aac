"""Configuration, registration, and what each dialect is sent (no server needed)."""

from __future__ import annotations

import click
import pytest
from exo_rkllm.client import _message, fork_messages, upstream_messages
from exo_rkllm.engine import RKLLMEngine, folder_overrides, sampling_options, server_url
from exo_rkllm.fake_server import FLASK_500

from exo_core import EngineError, SamplingParams
from exo_core.testing import default_engine, model_card


def test_server_url_from_option_then_environment_then_default():
    assert server_url(None, {}) == "http://localhost:8080"
    assert (
        server_url(None, {"RKLLM_SERVER_HOST": "board1", "RKLLM_SERVER_PORT": "9000"}) == "http://board1:9000"
    )
    assert server_url("10.0.0.5:8081", {"RKLLM_SERVER_HOST": "x"}) == "http://10.0.0.5:8081"
    assert server_url("https://npu.local/", {}) == "https://npu.local"


def test_engine_reads_its_cli_options(monkeypatch):
    monkeypatch.setenv("RKLLM_SERVER_HOST", "npu-box")
    assert RKLLMEngine().server_url == "http://npu-box:8080"
    engine = RKLLMEngine({"rkllm_server": "127.0.0.1:1234", "rkllm_model_dir": ("qwen-2.5-1.5b=My-Qwen",)})
    assert engine.server_url == "http://127.0.0.1:1234"
    assert engine.folder_for(model_card("qwen-2.5-1.5b")) == "My-Qwen"
    assert engine.folder_for(model_card("qwen-2.5-3b")) == "Qwen2.5-3B"
    names = {p.name for p in RKLLMEngine.cli_options if isinstance(p, click.Option)}
    assert names == {"rkllm_server", "rkllm_model_dir"}


def test_model_dir_overrides_parse_and_reject_nonsense():
    assert folder_overrides(("A=x", "b=y,c=z")) == {"a": "x", "b": "y", "c": "z"}
    assert folder_overrides({"Smollm2-135M": "S"}) == {"smollm2-135m": "S"}
    with pytest.raises(EngineError, match="MODEL=FOLDER"):
        folder_overrides(("no-equals-sign",))


def test_rkllm_is_the_default_engine_only_on_an_rk3588(monkeypatch):
    import exo_rkllm.engine as engine_module

    monkeypatch.setattr(engine_module, "is_rk3588", lambda: False)
    assert RKLLMEngine.default_priority() < 0
    assert default_engine() != "rkllm"
    monkeypatch.setattr(engine_module, "is_rk3588", lambda: True)
    assert default_engine() == "rkllm"


def test_cards_for_the_rk3588_models():
    expected = {
        "smollm2-135m": (30, "SmolLM2-135M-Instruct", None),
        "qwen-2.5-0.5b": (24, "Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"),
        "qwen-2.5-1.5b": (28, "Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"),
        "qwen-2.5-3b": (36, "Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct"),
        "qwen-2.5-7b": (28, "Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
        "deepseek-r1-distill-qwen-1.5b": (
            28,
            "DeepSeek-R1-1.5B",
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        ),
        "deepseek-r1-distill-qwen-7b": (28, "DeepSeek-R1-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
        "llama-3.2-1b": (16, "Llama-3.2-1B", "unsloth/Llama-3.2-1B-Instruct"),
        "llama-3.2-3b": (28, "Llama-3.2-3B", "unsloth/Llama-3.2-3B-Instruct"),
        "phi-3-mini": (32, "Phi-3-mini", "microsoft/Phi-3-mini-4k-instruct"),
        "tinyllama-1.1b": (22, "TinyLlama-1.1B", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    }
    for card_id, (layers, folder, tokenizer) in expected.items():
        card = model_card(card_id)
        assert (card.n_layers, card.sources["rkllm"], card.tokenizer) == (layers, folder, tokenizer)
        assert RKLLMEngine.can_serve(card)
    # Merged, not replaced: the embedded card keeps its GGUF for the other engines.
    assert model_card("smollm2-135m").sources["gguf"] == "embedded"


def test_fork_gets_system_prompt_folded_and_roles_alternating():
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": "Use French."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Salut"},
        {"role": "tool", "content": "42"},
    ]
    assert fork_messages(conversation) == [
        {"role": "user", "content": "Be terse.\n\nUse French.\n\nHi\n\nthere"},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "42"},
    ]
    assert fork_messages([{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}]) == [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Hi"},
    ]
    assert fork_messages([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]


def test_upstream_keeps_system_turns():
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert upstream_messages(conversation) == conversation


def test_sampling_becomes_upstream_options():
    assert sampling_options(SamplingParams(), None) == {"temperature": 0.0, "top_p": 1.0}
    full = SamplingParams(
        temperature=0.5, top_p=0.8, top_k=20, seed=3, presence_penalty=0.1, frequency_penalty=0.2
    )
    assert sampling_options(full, 100) == {
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 20,
        "seed": 3,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "num_predict": 100,
    }


def test_error_messages_come_from_json_or_flasks_html_page():
    assert _message({"error": "No models are currently loaded."}) == "No models are currently loaded."
    assert _message({"status": "error", "message": "Données JSON invalides !"}) == "Données JSON invalides !"
    assert _message(FLASK_500).startswith(
        "500 Internal Server Error — The server encountered an internal error"
    )
    assert (
        _message({"detail": "Failed to load model 'X': init failed"})
        == "Failed to load model 'X': init failed"
    )
    assert _message("") == "(empty body)"
