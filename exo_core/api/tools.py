"""Tool calling: the call format a chat template teaches, the grammar that forces a call, and
the model's output parsed back into OpenAI `tool_calls` (whole or streamed).

The format comes from the template itself, never from the model's name:

- `hermes` — the template writes `<tool_call>` (Hermes 2 Pro, Qwen 2/2.5/3, SmolLM3 and most
  ChatML tool templates): each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  after any prose.
- `llama3` — the template teaches JSON function calls with `"parameters"` (Llama 3.1/3.2/3.3:
  `<|python_tag|>` or the "dictionary of argument name and its value" instruction): the whole
  answer is `{"name": ..., "parameters": {...}}`, several joined by `;`.

A template that reads `tools` in neither way is refused with a 400 that says so.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from exo_core.node.constraints import json_lark, lark_grammar

HERMES = "hermes"
LLAMA3 = "llama3"

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def detect_format(template: str) -> str | None:
    """The tool-call format a chat template teaches, or None."""
    if _OPEN in template:
        return HERMES
    if _PYTHON_TAG in template or '"parameters": dictionary of argument name' in template:
        return LLAMA3
    return None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def _decode_call(text: str, args_key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get(args_key, data.get("arguments", data.get("parameters", {})))
    return _call(data["name"], arguments if arguments is not None else {})


def _json_objects(text: str) -> list[str] | None:
    """Top-level JSON objects in text, separated by whitespace or ';' (None: not only objects)."""
    decoder = json.JSONDecoder()
    out: list[str] = []
    i = 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i >= len(text):
            return out
        try:
            _, end = decoder.raw_decode(text, i)
        except ValueError:
            return None
        out.append(text[i:end])
        i = end


def parse(fmt: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a whole answer; text that is not a well-formed call stays content."""
    if fmt == HERMES:
        head, sep, rest = text.partition(_OPEN)
        if not sep:
            return text, []
        calls = []
        for piece in rest.split(_OPEN):
            body = piece.split(_CLOSE, 1)[0].strip()
            call = _decode_call(body, "arguments")
            if call is None:
                return text, []
            calls.append(call)
        return (head.strip() or None), calls
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :]
    if not body.lstrip().startswith("{"):
        return text, []
    objects = _json_objects(body)
    if not objects:
        return text, []
    calls = []
    for obj in objects:
        call = _decode_call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
    return None, calls


@dataclass
class ToolStream:
    """Splits a streamed answer into content to show now and tool calls as they complete."""

    fmt: str
    buffer: str = ""  # text held back: a possible start of a call, or calls in progress
    in_calls: bool = False
    decided: bool = False  # llama3: whether the answer is calls was settled by its first text
    content: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to emit now, calls completed by this text)."""
        if self.fmt == HERMES:
            return self._feed_hermes(text)
        return self._feed_llama3(text)

    def _feed_hermes(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        if not self.in_calls:
            at = self.buffer.find(_OPEN)
            if at < 0:
                keep = _partial_suffix(self.buffer, _OPEN)
                out, self.buffer = (
                    self.buffer[: len(self.buffer) - keep],
                    self.buffer[len(self.buffer) - keep :],
                )
                self.content.append(out)
                return out, []
            out = self.buffer[:at]
            self.content.append(out)
            self.buffer = self.buffer[at:]
            self.in_calls = True
        done = []
        while True:
            end = self.buffer.find(_CLOSE)
            if end < 0:
                break
            piece = self.buffer[: end + len(_CLOSE)]
            self.buffer = self.buffer[end + len(_CLOSE) :].lstrip()
            _, calls = parse(HERMES, piece)
            if calls:
                done.extend(calls)
            else:
                self.content.append(piece)  # not a call after all: it was text
                done_text = piece
                self.calls.extend(done)
                return done_text, done
        self.calls.extend(done)
        return "", done

    def _feed_llama3(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if self.decided and not self.in_calls:
            self.content.append(text)
            return text, []
        self.buffer += text
        if not self.decided:
            head = self.buffer.lstrip()
            if not head:
                return "", []
            if head.startswith("{") or head.startswith(_PYTHON_TAG):
                self.in_calls = True
            elif _PYTHON_TAG.startswith(head):
                return "", []  # could still be the tag
            self.decided = True
            if not self.in_calls:
                out, self.buffer = self.buffer, ""
                self.content.append(out)
                return out, []
        return "", []

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end of the answer: what is still held, as content or calls."""
        held, self.buffer = self.buffer, ""
        if not held:
            return "", []
        if self.in_calls:
            content, calls = parse(self.fmt, held)
            if calls:
                self.calls.extend(calls)
                return (content or ""), calls
        self.content.append(held)
        return held, []

    @property
    def text(self) -> str | None:
        """The answer's content: None when it only called tools; trimmed before calls."""
        out = "".join(self.content)
        if not self.calls:
            return out
        return out.strip() or None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of text that begins marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


# ---- forcing a call (tool_choice "required" or a named function) -------------------------------


def _call_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, args_key: parameters},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def call_grammar(fmt: str, tools: Sequence[dict[str, Any]], parallel: bool) -> str:
    """An llguidance grammar whose every output is one call (or several, when parallel) of `tools`."""
    args_key = "arguments" if fmt == HERMES else "parameters"
    schemas = [_call_schema(t, args_key) for t in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    one = "call"
    many = f"{one} (sep {one})*" if parallel else one
    if fmt == HERMES:
        lark = (
            f'start: {many}\ncall: "{_OPEN}\\n" body "\\n{_CLOSE}"\nsep: "\\n"\nbody: {json_lark(schema)}\n'
        )
    else:
        lark = f'start: {many}\ncall: body\nsep: "; "\nbody: {json_lark(schema)}\n'
    return lark_grammar(lark)
