"""Tool calling through the real API, with the official `openai` and `ollama` clients.

The model is a scripted engine (it answers with a fixed text, one token a step) over the
embedded model's tokenizer, given two real chat templates: Qwen 2.5's (Hermes `<tool_call>`)
and Llama 3.2's (JSON function calls). Rendering the templates (tools, assistant tool calls,
tool results) and parsing the answers are the real code paths.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ollama
import openai
import pytest
from core_helpers import api_node_config

from exo_core.api.testing import BackgroundNode
from exo_core.engine import InferenceEngine, StageInput, StageOutput
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard
from exo_core.models.tokenizer import load_tokenizer
from exo_core.plugins import registry

DATA = Path(__file__).parent / "data" / "templates"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class ScriptedEngine(InferenceEngine):
    """Answers every request with `script` (tokenized with the model's tokenizer), then end of turn."""

    name = "scripted"
    source_kinds = ("gguf",)
    script = "Hello."
    prompts: list[list[int]] = []  # noqa: RUF012 - the prompts it was sent, for the tests

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.tokenizer = None
        self.caches: dict[str, list[int]] = {}  # request -> the positions it was sent

    async def load(self, shard: Shard, model: ModelCard) -> None:
        self.tokenizer = load_tokenizer(model)

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        return [self._one(item) for item in items]

    def _one(self, item: StageInput) -> StageOutput:
        assert self.tokenizer is not None and item.tokens is not None
        ids = [int(t) for t in item.tokens]
        if item.start_pos == 0 or item.request_id not in self.caches:
            ScriptedEngine.prompts.append([])
        history = self.caches.setdefault(item.request_id, [])
        history.extend(ids)
        if len(ids) > 1 or not ScriptedEngine.prompts[-1]:
            ScriptedEngine.prompts[-1].extend(ids)  # prompt positions come in slices, answers one a step
        answer = self.tokenizer.encode(self.script)
        done = _progress(history, answer)
        logits = np.full(self.tokenizer.vocab_size, -30.0, dtype=np.float32)
        logits[answer[done] if done < len(answer) else min(self.tokenizer.eos_token_ids)] = 10.0
        return StageOutput(logits=logits)

    async def release(self, request_id: str) -> None:
        self.caches.pop(request_id, None)


def _progress(history: list[int], answer: list[int]) -> int:
    """How many answer tokens end the history (the longest suffix that begins the answer)."""
    for k in range(min(len(answer), len(history)), 0, -1):
        if history[-k:] == answer[:k]:
            return k
    return 0


def tokenizer_dir(tmp: Path, template: str) -> Path:
    """The embedded model's tokenizer with another chat template, as a Hugging Face directory."""
    base = load_tokenizer(registry().models["smollm2-135m"])
    out = tmp / template
    out.mkdir()
    base.hf.save(str(out / "tokenizer.json"))
    config = {
        "chat_template": (DATA / f"{template}.jinja").read_text(encoding="utf-8"),
        "eos_token": "<|im_end|>",
        "bos_token": "<|im_start|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("templates")
    reg = registry()
    base = reg.models["smollm2-135m"]
    cards = {
        name: dataclasses.replace(
            base, id=name, name=name, aliases=(), tokenizer=str(tokenizer_dir(tmp, name))
        )
        for name in ("qwen2.5", "llama3.2")
    }
    reg = dataclasses.replace(
        reg, engines={**reg.engines, "scripted": ScriptedEngine}, models={**reg.models, **cards}
    )
    config = api_node_config("tools", engine="scripted", model="qwen2.5")
    with BackgroundNode(config, registry=reg) as node:
        yield node


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def answer(text: str) -> None:
    ScriptedEngine.script = text


def last_prompt(server, model: str) -> str:
    tokenizer = load_tokenizer(server.runtime.registry.models[model])
    return tokenizer.decode(ScriptedEngine.prompts[-1])


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


@pytest.mark.parametrize(("model", "script"), [("qwen2.5", HERMES_CALL), ("llama3.2", LLAMA_CALL)])
def test_tool_call_parsed_for_each_template_family(server, client, model, script):
    answer(script)
    out = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = last_prompt(server, model)
    assert '"name": "get_weather"' in prompt and '"name": "get_time"' in prompt  # the template's tools


def test_prose_then_parallel_calls(client):
    answer(
        "Let me look.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    out = client.chat.completions.create(model="qwen2.5", messages=ASK, tools=[WEATHER, TIME])
    message = out.choices[0].message
    assert message.content == "Let me look."
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(message.tool_calls[1].function.arguments) == {"zone": "CET"}


def test_one_call_unless_parallel_calls_are_allowed(client):
    answer(HERMES_CALL + "\n" + HERMES_CALL.replace("Paris", "Rome"))
    out = client.chat.completions.create(
        model="qwen2.5", messages=ASK, tools=[WEATHER], parallel_tool_calls=False
    )
    assert [json.loads(c.function.arguments)["city"] for c in out.choices[0].message.tool_calls] == ["Paris"]
    out = client.chat.completions.create(model="qwen2.5", messages=ASK, tools=[WEATHER])
    assert len(out.choices[0].message.tool_calls) == 2


def test_plain_answer_with_tools_is_content(client):
    answer("It is sunny.")
    out = client.chat.completions.create(model="llama3.2", messages=ASK, tools=[WEATHER])
    assert out.choices[0].message.content == "It is sunny."
    assert not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("model", "script"), [("qwen2.5", HERMES_CALL), ("llama3.2", LLAMA_CALL)])
def test_streamed_tool_call(client, model, script):
    answer("Checking.\n" + script if model == "qwen2.5" else script)
    stream = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"name": "", "arguments": "", "id": part.id})
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert "<tool_call>" not in content and "get_weather" not in content
    assert content.strip() == ("Checking." if model == "qwen2.5" else "")
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finish == "tool_calls"


@pytest.mark.parametrize("model", ["qwen2.5", "llama3.2"])
def test_tool_result_round_trip(server, client, model):
    answer(HERMES_CALL if model == "qwen2.5" else LLAMA_CALL)
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    answer("It is sunny and 21 degrees in Paris.")
    second = client.chat.completions.create(model=model, messages=history, tools=[WEATHER])
    assert second.choices[0].message.content == "It is sunny and 21 degrees in Paris."
    prompt = last_prompt(server, model)
    # The call is rendered with its arguments as an object (not a JSON string in a string), and
    # the result in the template's own tool turn.
    assert '{"city": "Paris"}' in prompt
    assert '\\"city\\"' not in prompt
    if model == "qwen2.5":
        assert '<tool_response>\n{"sky": "sunny", "celsius": 21}\n</tool_response>' in prompt
    else:
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n"{\\"sky' in prompt or "ipython" in prompt


def test_tool_choice_none_renders_no_tools(server, client):
    answer("No tools needed.")
    out = client.chat.completions.create(model="qwen2.5", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.content == "No tools needed."
    assert "get_weather" not in last_prompt(server, "qwen2.5")


def test_forced_tool_call_follows_the_grammar(client):
    # The script's own call fits the grammar of a call to get_weather, so it comes out whole.
    answer(HERMES_CALL)
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(
        model="qwen2.5", messages=ASK, tools=[WEATHER, TIME], tool_choice=named
    )
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_template_without_tools_refuses_them(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=[WEATHER])
    assert err.value.code == "tools_not_supported"
    assert "no tool support" in err.value.message


def test_ollama_tool_calls(server):
    answer(HERMES_CALL)
    client = ollama.Client(host=server.url, timeout=30)
    out = client.chat(model="qwen2.5", messages=ASK, tools=[WEATHER], stream=False)
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    answer("Sunny.")
    again = client.chat(model="qwen2.5", messages=history, tools=[WEATHER], stream=False)
    assert again.message.content == "Sunny."
    answer("One moment.\n" + HERMES_CALL)
    parts = list(client.chat(model="qwen2.5", messages=ASK, tools=[WEATHER], stream=True))
    assert "".join(p.message.content for p in parts).strip() == "One moment."
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert parts[-1].done and parts[-1].done_reason == "stop"
