"""The OpenAI wire format: request validation, response and error shapes.

Every field OpenAI defines for /v1/chat/completions and /v1/completions is either honoured
or refused with a 400 that names it; a field exo cannot honour is accepted only when it asks
for nothing (null, false, empty, or the value that means "the default"), so no request is
ever answered as if a field it set had been applied. Fields OpenAI does not define are
refused too ("unrecognized request argument"), except `top_k`, which exo honours.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exo_core.node.sampling import SamplingParams

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CHOICES = 16  # n (times the number of prompts for /v1/completions)
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
INT64 = (-(2**63), 2**63 - 1)


class APIError(Exception):
    """An error with its HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- requests --------------------------------------------------------------------------------


@dataclass
class GenerationParams:
    """What both endpoints share, after validation."""

    model: str
    max_tokens: int | None
    sampling: SamplingParams
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    # {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}; None: plain text
    response_format: dict[str, Any] | None = None

    def sampling_for_choice(self, index: int) -> SamplingParams:
        """Choice i of n samples with seed + i, so choices differ yet each is reproducible."""
        if self.sampling.seed is None or index == 0:
            return self.sampling
        seed = (self.sampling.seed + index - INT64[0]) % 2**64 + INT64[0]
        return SamplingParams(**{**self.sampling.to_dict(), "seed": seed})


@dataclass
class ChatRequest(GenerationParams):
    messages: list[dict[str, Any]] = field(default_factory=list)
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {...}}]
    tool_choice: str | dict[str, Any] = "auto"  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True

    @property
    def forced_tools(self) -> list[dict[str, Any]]:
        """The tools one of which the answer must call (empty: the model may answer in text)."""
        if not self.tools or self.tool_choice in ("none", "auto"):
            return []
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools if t["function"]["name"] == name]
        return list(self.tools)


@dataclass
class CompletionRequest(GenerationParams):
    prompts: list[str] = field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None  # how many alternatives per token (0..5); None: no logprobs


_SHARED_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "stream",
    "stream_options",
    "user",
}
_CHAT_FIELDS = _SHARED_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "safety_identifier",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
}
_COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt", "echo"}


def _empty(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: _empty(value) or value in allowed


# OpenAI fields exo accepts only when they ask for nothing: name -> (accepts, why it cannot do more).
_NOOP_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (_empty, "the deprecated functions field is not supported; send tools"),
    "function_call": (
        _one_of("none"),
        "the deprecated function_call field is not supported; send tool_choice",
    ),
    "logit_bias": (_empty, "logit_bias is not supported"),
    "audio": (_empty, "audio output is not supported"),
    "modalities": (lambda v: _empty(v) or v == ["text"], "only the text modality is supported"),
    "prediction": (_empty, "predicted outputs are not supported"),
    "reasoning_effort": (_empty, "reasoning effort is not supported"),
    "verbosity": (_empty, "verbosity is not supported"),
    "web_search_options": (_empty, "web search is not supported"),
    "store": (_empty, "exo does not store completions"),
    "metadata": (_empty, "metadata is only for stored completions, and exo does not store them"),
    "service_tier": (_one_of("auto", "default"), "exo has no service tiers"),
    "moderation": (_empty, "moderation is not supported"),
    "prompt_cache_key": (_empty, "prompt cache routing is not supported"),
    "prompt_cache_retention": (_empty, "prompt cache retention is not supported"),
    "prompt_cache_options": (_empty, "prompt cache options are not supported"),
    # /v1/completions
    "suffix": (_empty, "suffix (insertion) is not supported"),
    "best_of": (lambda v: v is None or v == 1, "best_of is not supported; use n"),
}
_CHAT_NOOP = set(_NOOP_ONLY) - {"suffix", "best_of"}
_COMPLETION_NOOP = {"logit_bias", "suffix", "best_of"}


class _Body:
    """Typed access to a JSON object's fields; null means "not given", as in OpenAI's API."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def int(self, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise invalid(f"{name} must be an integer, not {_describe(value)}", name)
        _check_range(name, value, lo, hi)
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise invalid(f"{name} must be a number, not {_describe(value)}", name)
        _check_range(name, value, lo, hi)
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(f"{name} must be true or false, not {_describe(value)}", name)
        return value

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string, not {_describe(value)}", name)
        return value


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise invalid(f"{name} must be at least {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise invalid(f"{name} must be at most {hi}, got {value}", name)


def _describe(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)
    text = json.dumps(value)
    return f"{kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


def _object(body: Any) -> _Body:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {_describe(body)}")
    return _Body(body)


def _refuse_unsupported(body: _Body, honoured: set[str], noop_only: set[str]) -> None:
    for name, value in body.data.items():
        if name in honoured:
            continue
        if name in noop_only:
            accepts, why = _NOOP_ONLY[name]
            if not accepts(value):
                raise invalid(f"{name} is not supported by exo: {why}", name, "unsupported_parameter")
            continue
        raise invalid(f"Unrecognized request argument supplied: {name}", name, "unrecognized_argument")


def _shared(body: _Body, *, default_max_tokens: int | None, max_tokens: int | None = None) -> dict[str, Any]:
    model = body.str("model")
    if not model:
        raise invalid("model is required: name a model from GET /v1/models", "model")
    stream = body.bool("stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise invalid(f"stream_options must be an object, not {_describe(options)}", "stream_options")
        for key, value in options.items():
            if key == "include_usage":
                if not isinstance(value, bool):
                    raise invalid("stream_options.include_usage must be true or false", "stream_options")
                include_usage = value
            elif key == "include_obfuscation" and value is False:
                pass  # exo never pads its stream, so asking for no padding is already true
            else:
                raise invalid(
                    f"stream_options.{key} is not supported by exo (only include_usage)", "stream_options"
                )
    n = body.int("n", 1, 1, MAX_CHOICES)
    assert n is not None
    if max_tokens is None:
        max_tokens = body.int("max_tokens", default_max_tokens, 1, INT64[1])
    top_k = body.int("top_k", 0, -1, INT64[1])
    return dict(
        model=model,
        max_tokens=max_tokens,
        n=n,
        stop=_stops(body.get("stop")),
        stream=stream,
        include_usage=include_usage,
        user=body.str("user"),
        sampling=dict(
            temperature=body.number("temperature", 1.0, 0.0, 2.0),
            top_p=body.number("top_p", 1.0, 0.0, 1.0),
            top_k=max(top_k or 0, 0),  # -1 (vLLM's "off") and 0 both mean no top-k cut
            seed=body.int("seed", None, *INT64),
            presence_penalty=body.number("presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=body.number("frequency_penalty", 0.0, -2.0, 2.0),
        ),
    )


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOPS:
            raise invalid(f"stop may hold at most {MAX_STOPS} strings, got {len(value)}", "stop")
        return tuple(s for s in value if s)
    raise invalid(f"stop must be a string or an array of strings, not {_describe(value)}", "stop")


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise invalid("messages is required: an array of {role, content} objects", "messages")
    if not isinstance(value, list):
        raise invalid(f"messages must be an array, not {_describe(value)}", "messages")
    if not value:
        raise invalid("messages must hold at least one message", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with role and content, not {_describe(message)}", where)
        role = message.get("role")
        if role == "function":
            raise invalid(f"{where}.role 'function' is deprecated and not supported; use 'tool'", where)
        if role not in _ROLES:
            raise invalid(
                f"{where}.role must be one of system, developer, user, assistant, tool; got {_describe(role)}",
                f"{where}.role",
            )
        out_message: dict[str, Any] = {"role": _ROLES[role]}
        for key, val in message.items():
            if key in ("role", "content"):
                continue
            if key == "refusal" and val is None:
                continue
            if key in ("function_call", "audio") and _empty(val):
                continue
            if key == "tool_calls" and role == "assistant":
                if not _empty(val):
                    out_message["tool_calls"] = _history_calls(val, f"{where}.tool_calls")
                continue
            if key == "tool_call_id" and role == "tool":
                if not isinstance(val, str) or not val:
                    raise invalid(f"{where}.tool_call_id must be a non-empty string", f"{where}.tool_call_id")
                out_message["tool_call_id"] = val
                continue
            if key == "name" and role == "tool" and isinstance(val, str):
                out_message["name"] = val
                continue
            if key == "name":
                raise invalid(
                    f"{where}.name is not supported: the model's chat template has no participant names",
                    f"{where}.name",
                )
            raise invalid(f"{where}.{key} is not supported", f"{where}.{key}")
        content = message.get("content")
        if content is None and "tool_calls" in out_message:
            content = ""
        if role == "tool" and "tool_call_id" not in out_message:
            raise invalid(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id")
        out_message["content"] = _content(content, f"{where}.content")
        out.append(out_message)
    return out


def _history_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls, with arguments as objects (as chat templates render them)."""
    if not isinstance(value, list):
        raise invalid(f"{where} must be an array of tool calls", where)
    calls = []
    for j, call in enumerate(value):
        here = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"{here} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", here)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as exc:
                raise invalid(f"{here}.function.arguments is not valid JSON ({exc})", here) from exc
        calls.append(
            {
                "id": call.get("id") or f"call_{j}",
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return calls


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if _empty(value):
        return None
    if not isinstance(value, list):
        raise invalid(f"tools must be an array, not {_describe(value)}", "tools")
    tools, names = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise invalid(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function must be an object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise invalid(
                f"{where}.function.name must be 1 to 64 letters, digits, _, - or .", f"{where}.function.name"
            )
        if name in names:
            raise invalid(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid(
                f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters"
            )
        tools.append({"type": "function", "function": dict(function)})
    return tools


def _tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    if value is None:
        return "auto" if tools else "none"
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise invalid("tool_choice 'required' needs tools", "tool_choice")
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        name = (value.get("function") or {}).get("name")
        if not tools or name not in {t["function"]["name"] for t in tools}:
            raise invalid(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    raise invalid(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice",
    )


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None or value == {"type": "text"}:
        return None
    if not isinstance(value, dict):
        raise invalid(f"response_format must be an object, not {_describe(value)}", "response_format")
    kind = value.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise invalid(
                "response_format.json_schema must be an object with a name (and a schema)",
                "response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise invalid(
                "response_format.json_schema.schema must be an object", "response_format.json_schema"
            )
        return {"type": "json_schema", "json_schema": {"name": spec["name"], "schema": schema}}
    raise invalid(
        f"response_format.type must be text, json_object or json_schema; got {_describe(kind)}",
        "response_format.type",
    )


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise invalid(f"{where} is required (a string, or an array of text parts)", where)
    if not isinstance(value, list):
        raise invalid(f"{where} must be a string or an array of text parts, not {_describe(value)}", where)
    texts = []
    for j, part in enumerate(value):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"{here} must be an object like {{'type': 'text', 'text': ...}}", here)
        kind = part.get("type")
        if kind != "text":
            raise invalid(
                f"{here}.type {kind!r} is not supported: exo serves text models, send only text parts",
                f"{here}.type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{here}.text must be a string, not {_describe(text)}", f"{here}.text")
        texts.append(text)
    return "\n".join(texts)


def parse_chat_request(data: Any) -> ChatRequest:
    """A validated chat request, or an APIError naming the field at fault."""
    body = _object(data)
    _refuse_unsupported(body, _CHAT_FIELDS, _CHAT_NOOP)
    messages = _messages(body.get("messages"))
    max_tokens = body.int("max_tokens", None, 1, INT64[1])
    max_completion = body.int("max_completion_tokens", None, 1, INT64[1])
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid(
            "max_tokens and max_completion_tokens disagree; send only max_completion_tokens",
            "max_completion_tokens",
        )
    limit = max_completion if max_completion is not None else max_tokens
    logprobs = body.bool("logprobs", False)
    top_logprobs = body.int("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs needs logprobs set to true", "top_logprobs")
    shared = _shared(body, default_max_tokens=None, max_tokens=limit)
    user = shared.pop("user") or body.str("safety_identifier")
    sampling = SamplingParams(
        **shared.pop("sampling"), top_logprobs=(top_logprobs or 0) if logprobs else None
    )
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    return ChatRequest(
        **shared,
        user=user,
        sampling=sampling,
        messages=messages,
        logprobs=logprobs,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.bool("parallel_tool_calls", True),
        response_format=_response_format(body.get("response_format")),
    )


def parse_completion_request(data: Any) -> CompletionRequest:
    """A validated completion request, or an APIError naming the field at fault."""
    body = _object(data)
    _refuse_unsupported(body, _COMPLETION_FIELDS, _COMPLETION_NOOP)
    prompts = _prompts(body.get("prompt"))
    logprobs = body.int("logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    echo = body.bool("echo", False)
    if echo and logprobs is not None:
        raise invalid("echo with logprobs is not supported (exo does not score prompt tokens)", "echo")
    shared = _shared(body, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
    if shared["n"] * len(prompts) > MAX_CHOICES:
        raise invalid(f"n times the number of prompts must be at most {MAX_CHOICES}", "n")
    sampling = SamplingParams(**shared.pop("sampling"), top_logprobs=logprobs)
    return CompletionRequest(**shared, sampling=sampling, prompts=prompts, echo=echo, logprobs=logprobs)


def _prompts(value: Any) -> list[str]:
    if value is None:
        raise invalid("prompt is required: a string or an array of strings", "prompt")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return list(value)
    if isinstance(value, list) and value and all(isinstance(p, int | list) for p in value):
        raise invalid("prompt as token ids is not supported; send the text", "prompt")
    raise invalid(
        f"prompt must be a string or a non-empty array of strings, not {_describe(value)}", "prompt"
    )


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as logprobs report it: its bytes, log-probability, and alternatives."""

    data: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's `logprobs` object: one entry per token with its top alternatives."""
    return {
        "content": [
            {
                "token": _text(t.data),
                "logprob": t.logprob,
                "bytes": list(t.data),
                "top_logprobs": [{"token": _text(b), "logprob": lp, "bytes": list(b)} for b, lp in t.top],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object (parallel arrays)."""
    offsets, pos = [], text_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(_text(t.data))
    return {
        "tokens": [_legacy_token(t.data) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_legacy_token(b): lp for b, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def _legacy_token(data: bytes) -> str:
    """Legacy completions write a token that is not whole UTF-8 as 'bytes:\\xNN...' (as OpenAI does)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def model_object(card: Any, created: int, *, loaded: bool, downloaded: bool, nodes: list[str]) -> dict:
    return {
        "id": card.id,
        "object": "model",
        "created": created,
        "owned_by": "exo",
        "name": card.name,
        "n_layers": card.n_layers,
        "context_length": card.context_length,
        "aliases": list(card.aliases),
        "loaded": loaded,
        "downloaded": downloaded,
        "nodes": nodes,
    }
