"""Tool-call formats and parsers (api/tools.py): whole answers, streamed pieces, forced-call grammars."""

from __future__ import annotations

import json

import pytest

from exo_core.api import tools
from exo_core.models.tokenizer import load_tokenizer
from exo_core.node.constraints import Constraint, check_grammar
from exo_core.plugins import registry

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_format_comes_from_the_template():
    assert tools.detect_format("... <tool_call>\n{...}</tool_call> ...") == tools.HERMES
    assert (
        tools.detect_format('{"name": function name, "parameters": dictionary of argument name and ...')
        == tools.LLAMA3
    )
    assert tools.detect_format("{{ '<|python_tag|>' }}") == tools.LLAMA3
    assert tools.detect_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (
            tools.HERMES,
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
            "Sure.",
            [("f", {"a": 1})],
        ),
        (
            tools.HERMES,
            '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {"b": "x"}}</tool_call>',
            None,
            [("f", {}), ("g", {"b": "x"})],
        ),
        (
            tools.HERMES,
            '<tool_call>\n{"name": "f", "arguments": {"a": 1}}',
            None,
            [("f", {"a": 1})],
        ),  # cut before the close
        (tools.HERMES, "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
        (tools.HERMES, "Just text.", "Just text.", []),
        (tools.LLAMA3, '{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
        (
            tools.LLAMA3,
            '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": 2}}',
            None,
            [("f", {}), ("g", {"x": 2})],
        ),
        (tools.LLAMA3, "{not a call}", "{not a call}", []),
        (tools.LLAMA3, 'It is {"name": "f"}', 'It is {"name": "f"}', []),
    ],
)
def test_parse_whole_answers(fmt, text, content, calls):
    got_content, got_calls = tools.parse(fmt, text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got_calls)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_pieces_give_the_same_result(size):
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    stream = tools.ToolStream(tools.HERMES)
    shown = ""
    for i in range(0, len(text), size):
        piece, _ = stream.feed(text[i : i + size])
        shown += piece
    rest, _ = stream.finish()
    shown += rest
    assert shown == "Let me check.\n"
    assert "<tool" not in shown
    assert [c["function"]["name"] for c in stream.calls] == ["f", "g"]
    assert stream.text == "Let me check."


def test_llama3_stream_decides_on_the_first_text():
    prose = tools.ToolStream(tools.LLAMA3)
    assert prose.feed("  ")[0] == ""
    assert prose.feed("It is sunny")[0] == "  It is sunny"
    call = tools.ToolStream(tools.LLAMA3)
    for piece in ['{"name": ', '"f", "parameters": ', "{}}"]:
        assert call.feed(piece) == ("", [])
    assert call.finish()[1][0]["function"]["name"] == "f"


@pytest.mark.parametrize("fmt", [tools.HERMES, tools.LLAMA3])
def test_forced_call_grammar_accepts_a_call_and_nothing_else(fmt):
    tokenizer = load_tokenizer(registry().models["smollm2-135m"])
    grammar = tools.call_grammar(fmt, [WEATHER], parallel=False)
    check_grammar(grammar, tokenizer)
    key = "arguments" if fmt == tools.HERMES else "parameters"
    call = json.dumps({"name": "get_weather", key: {"city": "Paris"}})
    good = f"<tool_call>\n{call}\n</tool_call>" if fmt == tools.HERMES else call
    constraint = Constraint(grammar, tokenizer)
    for token in tokenizer.encode(good):
        assert constraint.allowed()[token]
        constraint.consume(token)
    allowed = constraint.allowed()
    assert allowed[min(tokenizer.eos_token_ids)] and allowed.sum() == 1  # only end of turn now
    prose = Constraint(grammar, tokenizer)
    assert not prose.allowed()[tokenizer.encode("Hello")[0]]
