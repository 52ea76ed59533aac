"""Structured output, forced tool calls and the prefix cache on the real 135M model (tinygrad).

The grammar is enforced at the sampler, so even this small model answers with JSON that
validates against the schema; a ten-turn chat reuses each turn's cache and answers exactly
as it does without the cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import ollama
import openai
import pytest

from exo_core.api.testing import BackgroundNode
from exo_core.models.tokenizer import load_tokenizer
from exo_core.node.prefix_cache import PrefixIndex
from exo_core.plugins import registry
from exo_core.runtime import NodeConfig

pytestmark = pytest.mark.skipif(
    "tinygrad" not in registry().engines or not registry().engines["tinygrad"].available()[0],
    reason="the tinygrad engine is not installed",
)

MODEL = "smollm2-135m"
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["city", "country", "population_millions", "tags"],
    "additionalProperties": False,
}


def tokenizer_dir(tmp: Path, template: str) -> Path:
    """The embedded model's tokenizer with another chat template, as a Hugging Face directory."""
    base = load_tokenizer(registry().models[MODEL])
    out = tmp / template
    out.mkdir()
    base.hf.save(str(out / "tokenizer.json"))
    source = (Path(__file__).parent / "data" / "templates" / f"{template}.jinja").read_text(encoding="utf-8")
    config = {"chat_template": source, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reg = registry()
    base = reg.models[MODEL]
    qwen = dataclasses.replace(
        base,
        id="smollm2-135m-qwen-template",
        aliases=(),
        tokenizer=str(tokenizer_dir(tmp_path_factory.mktemp("templates"), "qwen2.5")),
    )
    reg = dataclasses.replace(reg, models={**reg.models, qwen.id: qwen})
    config = NodeConfig(
        engine="tinygrad",
        model=MODEL,
        api_host="127.0.0.1",
        api_port=0,
        node_host="127.0.0.1",
        discovery="none",
        node_id="real",
    )
    with BackgroundNode(config, registry=reg, start_timeout=300) as node:
        yield node


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def test_schema_constrained_answer_validates(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY, "strict": True},
        },
        temperature=0,
        max_tokens=120,
    )
    assert out.choices[0].finish_reason == "stop"
    answer = json.loads(out.choices[0].message.content)
    jsonschema.validate(answer, CITY)


def test_json_mode_and_ollama_format(client, server):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    reply = ollama.Client(host=server.url, timeout=300).chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Rome."}],
        format=CITY,
        stream=False,
        options={"temperature": 0, "num_predict": 120},
    )
    jsonschema.validate(json.loads(reply.message.content), CITY)


def test_required_tool_call_from_the_real_model(client):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    out = client.chat.completions.create(
        model="smollm2-135m-qwen-template",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])


QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "And of Italy?",
    "And of Spain?",
    "Which of these is the largest city?",
    "Name a river in the first one.",
    "What language is spoken there?",
    "Say hello in that language.",
    "Now count to three in it.",
    "What is 2 + 2?",
    "Thank you. Say goodbye.",
]


def ten_turns(client) -> tuple[list[str], list[int]]:
    messages: list[dict] = []
    answers, cached = [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
        text = out.choices[0].message.content
        messages.append({"role": "assistant", "content": text})
        answers.append(text)
        cached.append(out.usage.prompt_tokens_details.cached_tokens)
    return answers, cached


def test_ten_turn_chat_reuses_the_prefix_and_answers_alike(client, server):
    node = server.runtime.node
    with_cache, cached = ten_turns(client)
    assert "Paris" in with_cache[0]
    assert cached[0] == 0 or cached[0] < 40  # the first turn can only share the system turn
    assert all(c > 0 for c in cached[1:]), cached
    kept, node.stage.kept.budget_bytes = node.stage.kept.budget_bytes, 0  # the cache off
    node.origin.prefixes = PrefixIndex()
    try:
        without, cached_off = ten_turns(client)
    finally:
        node.stage.kept.budget_bytes = kept
    assert cached_off == [0] * len(QUESTIONS)
    assert with_cache == without
