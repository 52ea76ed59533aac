"""Ollama's API beside OpenAI's: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

Requests are validated into the same `ChatRequest` / `CompletionRequest` the OpenAI routes use
and run by the same `CompletionRun`; only the shapes differ: NDJSON lines instead of SSE,
`options` instead of top-level sampling fields, `format` instead of `response_format`,
durations in nanoseconds, and errors as `{"error": "message"}`.

Choices made where Ollama and exo differ (said in the README too): model names are listed as
`<id>:latest` and accepted with or without `:latest`; `keep_alive` is accepted and ignored (a
node keeps its shard while it runs); runtime options that only tune Ollama's own loader
(`num_ctx`, `num_gpu`, `num_thread`, ...) are accepted and ignored; sampling options exo
cannot honour (`mirostat`, `repeat_penalty` != 1, `min_p`, ...) are refused with a 400 naming
them, as the OpenAI routes refuse fields they cannot honour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from exo_core import __version__
from exo_core.api import protocol
from exo_core.api.completions import _CLIENT_GONE, Choice, CompletionRun, _dumps
from exo_core.api.protocol import APIError, ChatRequest, CompletionRequest
from exo_core.api.state import STATE, ApiState, read_json
from exo_core.models.cards import ModelCard
from exo_core.node.sampling import SamplingParams

# The Ollama API level these routes follow (clients gate features on it); exo's own version
# is reported beside it.
OLLAMA_API_VERSION = "0.12.0"
NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
_TAG = ":latest"

# Options that tune Ollama's runner (memory, threads, batch): nothing to do in exo.
_LOADER_OPTIONS = {
    "numa",
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
    "penalize_newline",
}
# Sampling options exo does not have, accepted only at their "off" value.
_OFF_VALUES: dict[str, Any] = {
    "repeat_penalty": 1.0,
    "repeat_last_n": None,
    "tfs_z": 1.0,
    "typical_p": 1.0,
    "min_p": 0.0,
    "mirostat": 0,
    "mirostat_tau": None,
    "mirostat_eta": None,
}


def ollama_name(card: ModelCard) -> str:
    return card.id + _TAG


def model_id(name: str) -> str:
    """Ollama names carry a tag; exo's ids are the name without `:latest`."""
    return name[: -len(_TAG)] if name.endswith(_TAG) else name


def _timestamp(at: float | None = None) -> str:
    return (
        datetime.fromtimestamp(at if at is not None else time.time(), UTC).isoformat().replace("+00:00", "Z")
    )


def _ns(seconds: float | None) -> int:
    return round((seconds or 0.0) * 1e9)


# ---- requests --------------------------------------------------------------------------------


def _body(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise protocol.invalid("the request body must be a JSON object")
    return data


def _model(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise protocol.invalid("model is required: name a model from GET /api/tags", "model")
    return model_id(name)


def _options(body: dict[str, Any]) -> tuple[dict[str, Any], int | None, tuple[str, ...]]:
    """(sampling fields, num_predict as max_tokens, stop strings) from `options`."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise protocol.invalid("options must be an object", "options")
    for name, value in options.items():
        if name in _LOADER_OPTIONS or value is None:
            continue
        if name in _OFF_VALUES:
            off = _OFF_VALUES[name]
            if off is None or value == off:
                continue
            raise protocol.invalid(
                f"options.{name} is not supported by exo (only {off}, which turns it off)",
                f"options.{name}",
                "unsupported_parameter",
            )
        if name not in {
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "num_predict",
            "stop",
            "presence_penalty",
            "frequency_penalty",
        }:
            raise protocol.invalid(f"options.{name} is not an option exo knows", f"options.{name}")
    view = protocol._Body(options)
    temperature = view.number("temperature", 0.8, 0.0, 2.0)  # Ollama's default
    num_predict = view.int("num_predict", None, -2, protocol.INT64[1])
    max_tokens = None if num_predict is None or num_predict < 0 else num_predict
    if max_tokens == 0:
        max_tokens = None  # Ollama treats 0 as "no limit" too
    top_k = view.int("top_k", 0, -1, protocol.INT64[1]) or 0
    sampling = dict(
        temperature=temperature,
        top_p=view.number("top_p", 1.0, 0.0, 1.0),
        top_k=max(top_k, 0),
        seed=view.int("seed", None, *protocol.INT64),
        presence_penalty=view.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=view.number("frequency_penalty", 0.0, -2.0, 2.0),
    )
    stops = protocol._stops(options.get("stop"))
    return sampling, max_tokens, stops


def _check_common(body: dict[str, Any], known: set[str]) -> None:
    for name in body:
        if name not in known:
            raise protocol.invalid(f"{name} is not a field exo knows for this route", name)
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and not isinstance(keep_alive, str | int | float):
        raise protocol.invalid("keep_alive must be a duration string or a number of seconds", "keep_alive")
    if body.get("think") not in (None, False):
        raise protocol.invalid("think is not supported: exo's models do not separate thinking", "think")
    if body.get("images"):
        raise protocol.invalid("images are not supported: exo serves text models", "images")
    if body.get("logprobs"):
        raise protocol.invalid("logprobs are not supported on the Ollama routes; use /v1", "logprobs")


def _format(value: Any) -> dict[str, Any] | None:
    """Ollama's `format` as an OpenAI `response_format`."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value, "strict": True}}
    raise protocol.invalid('format must be "json" or a JSON schema object', "format")


# `truncate` and `shift` (what Ollama does when a prompt outgrows the context) are accepted and
# ignored: exo answers such a prompt with a context-length error instead.
_COMMON = {
    "model",
    "stream",
    "options",
    "format",
    "keep_alive",
    "think",
    "logprobs",
    "top_logprobs",
    "truncate",
    "shift",
}


def parse_chat(data: Any) -> ChatRequest:
    body = _body(data)
    _check_common(body, _COMMON | {"messages", "tools"})
    sampling, max_tokens, stops = _options(body)
    messages = _messages(body.get("messages"))
    tools = body.get("tools") or None
    openai_body: dict[str, Any] = {"model": _model(body), "messages": messages}
    if tools is not None:
        openai_body["tools"] = tools
    fmt = _format(body.get("format"))
    if fmt is not None:
        openai_body["response_format"] = fmt
    req = protocol.parse_chat_request(openai_body)
    _apply_options(req, body, sampling, max_tokens, stops)
    return req


def _apply_options(
    req: ChatRequest | CompletionRequest,
    body: dict[str, Any],
    sampling: dict[str, Any],
    max_tokens: int | None,
    stops: tuple[str, ...],
) -> None:
    """Ollama's `options` (as `_options` read them) and stream flag onto a parsed OpenAI request."""
    req.max_tokens = max_tokens
    req.stop = stops
    req.sampling = SamplingParams(**sampling)
    req.stream = _stream_flag(body)


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is None:
        return True  # Ollama streams unless told not to
    if not isinstance(stream, bool):
        raise protocol.invalid("stream must be true or false", "stream")
    return stream


def _messages(value: Any) -> list[dict[str, Any]]:
    """Ollama messages in OpenAI's shape (tool calls get ids; arguments become JSON text)."""
    if not isinstance(value, list) or not value:
        raise protocol.invalid("messages must be a non-empty array of {role, content}", "messages")
    out: list[dict[str, Any]] = []
    call_ids: list[str] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise protocol.invalid(f"{where} must be an object with role and content", where)
        if message.get("images"):
            raise protocol.invalid(f"{where}.images are not supported: exo serves text models", where)
        if message.get("thinking"):
            raise protocol.invalid(f"{where}.thinking is not supported", where)
        role = message.get("role")
        content = message.get("content")
        converted: dict[str, Any] = {"role": role, "content": content if content is not None else ""}
        calls = message.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise protocol.invalid(f"{where}.tool_calls must be an array", f"{where}.tool_calls")
            converted["tool_calls"] = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise protocol.invalid(
                        f"{where}.tool_calls entries need a function object", f"{where}.tool_calls"
                    )
                call_id = f"call_{len(call_ids)}"
                call_ids.append(call_id)
                arguments = function.get("arguments", {})
                converted["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": function.get("name"),
                            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                        },
                    }
                )
            if content in (None, ""):
                converted["content"] = None
        if role == "tool":
            converted["tool_call_id"] = call_ids[-1] if call_ids else "call_0"
            if isinstance(message.get("tool_name"), str):
                converted["name"] = message["tool_name"]
        out.append(converted)
    return out


def parse_generate(data: Any) -> ChatRequest | CompletionRequest:
    """/api/generate: the prompt in the model's chat template (with `system`), or `raw` text."""
    body = _body(data)
    _check_common(body, _COMMON | {"prompt", "system", "raw", "suffix", "template", "context", "images"})
    if body.get("suffix"):
        raise protocol.invalid("suffix (fill in the middle) is not supported", "suffix")
    if body.get("template"):
        raise protocol.invalid(
            "template is not supported: exo renders the model's own chat template", "template"
        )
    if body.get("context"):
        raise protocol.invalid(
            "context (token ids of an earlier answer) is not supported; send the conversation to /api/chat",
            "context",
        )
    prompt = body.get("prompt")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise protocol.invalid("prompt must be a string", "prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise protocol.invalid("system must be a string", "system")
    raw = body.get("raw") is True
    sampling, max_tokens, stops = _options(body)
    fmt = _format(body.get("format"))
    req: ChatRequest | CompletionRequest
    if raw:
        if not prompt:
            raise protocol.invalid("prompt is required with raw", "prompt")
        req = protocol.parse_completion_request({"model": _model(body), "prompt": prompt})
        if fmt is not None:
            req.response_format = fmt
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        openai_body: dict[str, Any] = {"model": _model(body), "messages": messages}
        if fmt is not None:
            openai_body["response_format"] = fmt
        req = protocol.parse_chat_request(openai_body)
    _apply_options(req, body, sampling, max_tokens, stops)
    return req


# ---- running ---------------------------------------------------------------------------------


class OllamaRun(CompletionRun):
    """A CompletionRun that answers in Ollama's shapes (one choice)."""

    def __init__(
        self, state: ApiState, req: ChatRequest | CompletionRequest, endpoint: str, name: str
    ) -> None:
        super().__init__(state, req, endpoint)
        self.name = name  # as the client named the model
        self.started = time.perf_counter()

    def _line(self, choice: Choice, text: str, done_reason: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.name, "created_at": _timestamp()}
        chat_route = self.endpoint == "/api/chat"
        if chat_route:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            calls = self.tool_calls_of(choice) if done_reason is not None else []
            if calls:
                message["tool_calls"] = [
                    {"function": {"name": c["function"]["name"], "arguments": _arguments(c)}} for c in calls
                ]
            out["message"] = message
        else:
            out["response"] = text
        out["done"] = done_reason is not None
        if done_reason is not None:
            usage = choice.usage
            first = usage.first_token_s or 0.0
            out.update(
                done_reason=done_reason,
                total_duration=_ns(time.perf_counter() - self.started),
                load_duration=0,
                prompt_eval_count=usage.prompt_tokens,
                prompt_eval_duration=_ns(first),
                eval_count=usage.completion_tokens,
                eval_duration=_ns(max(usage.elapsed_s - first, 0.0)),
            )
            if not chat_route:
                out["context"] = []
        return out

    async def _collect(self) -> dict[str, Any]:  # type: ignore[override]
        async with contextlib.aclosing(self._events()) as events:
            async for choice, chunk in events:
                self.feed_text(choice, chunk)
        choice = self.choices[0]
        return self._line(choice, self.final_text(choice), _done_reason(choice))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            async with contextlib.aclosing(self._events()) as events:
                async for choice, chunk in events:
                    text = self.stream_text(choice, chunk)
                    lines = b""
                    if text:
                        lines += _dumps(self._line(choice, text, None)) + b"\n"
                    if chunk.finish_reason is not None:
                        lines += _dumps(self._line(choice, "", _done_reason(choice))) + b"\n"
                    if not lines:
                        continue
                    if response is None:
                        response = web.StreamResponse(headers=NDJSON_HEADERS)
                        await response.prepare(request)
                    await response.write(lines)
        except _CLIENT_GONE:
            self.state.log.info("client went away", request=self.id)
        except Exception as exc:
            if response is None:
                raise
            error = self.state.api_error(exc, self.endpoint)
            with contextlib.suppress(*_CLIENT_GONE):
                await response.write(_dumps({"error": error.message}) + b"\n")
        if response is None:
            response = web.StreamResponse(headers=NDJSON_HEADERS)
            await response.prepare(request)
        return response


def _done_reason(choice: Choice) -> str:
    if choice.finish_reason == "tool_calls":
        return "stop"
    return choice.finish_reason or "stop"


def _arguments(call: dict[str, Any]) -> Any:
    text = call["function"]["arguments"]
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---- handlers --------------------------------------------------------------------------------


def _state(request: web.Request) -> ApiState:
    return request.app[STATE]


async def chat(request: web.Request) -> web.StreamResponse:
    data = await read_json(request)
    req = parse_chat(data)
    return await OllamaRun(_state(request), req, "/api/chat", _name(data)).respond(request)


async def generate(request: web.Request) -> web.StreamResponse:
    data = await read_json(request)
    if isinstance(data, dict) and not data.get("prompt") and not data.get("raw"):
        # An empty prompt loads the model (Ollama's way to warm it up): say it is ready.
        state = _state(request)
        card = await state.resolve_model(_model(data))
        state.check_servable(card)
        return web.json_response(
            {
                "model": _name(data),
                "created_at": _timestamp(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        )
    req = parse_generate(data)
    return await OllamaRun(_state(request), req, "/api/generate", _name(data)).respond(request)


def _name(data: Any) -> str:
    name = data.get("model") or data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else ""


def _digest(card: ModelCard) -> str:
    """Stands in for Ollama's content digest: stable per model id (exo does not hash the weights)."""
    return hashlib.sha256(card.id.encode()).hexdigest()


def _details(card: ModelCard) -> dict[str, Any]:
    fmt = "gguf" if "gguf" in card.sources else next(iter(card.sources), "")
    return {
        "parent_model": "",
        "format": fmt,
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "",
        "quantization_level": "",
    }


def _size(card: ModelCard) -> int:
    from exo_core.models import files

    path = files.local_gguf(card)
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _served_cards(state: ApiState) -> list[ModelCard]:
    default = state.runtime.default_model.id
    ids = sorted(state.servers_by_model(), key=lambda m: (m != default, m))
    return [state.node.models[m] for m in ids]


async def tags(request: web.Request) -> web.Response:
    state = _state(request)
    cards = _served_cards(state)  # on the loop: the peer table changes there

    def listing() -> list[dict[str, Any]]:
        return [
            {
                "name": ollama_name(card),
                "model": ollama_name(card),
                "modified_at": _timestamp(state.created),
                "size": _size(card),
                "digest": _digest(card),
                "details": _details(card),
            }
            for card in cards
        ]

    return web.json_response({"models": await asyncio.to_thread(listing)})


async def ps(request: web.Request) -> web.Response:
    """Models whose weights this node's engine holds now (they stay while the node runs)."""
    state = _state(request)
    loaded = {shard.model_id for shard in state.node.engine.loaded_shards}
    never = "2318-01-01T00:00:00Z"  # no keep_alive expiry: a node keeps its shard while it runs
    models = []
    for model_id in sorted(loaded):
        card = state.node.models.get(model_id)
        if card is None:
            continue
        models.append(
            {
                "name": ollama_name(card),
                "model": ollama_name(card),
                "size": _size(card),
                "digest": _digest(card),
                "details": _details(card),
                "expires_at": never,
                "size_vram": 0,
                "context_length": state.generator.context_length(card),
            }
        )
    return web.json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    state = _state(request)
    body = _body(await read_json(request))
    card = await state.resolve_model(_model(body))
    tokenizer = await asyncio.to_thread(state.generator.tokenizer, card)
    capabilities = ["completion"]
    if tokenizer.chat_template.supports_tools:
        capabilities.append("tools")
    return web.json_response(
        {
            "modelfile": f"# exo model card {card.id}\nFROM {card.id}\n",
            "parameters": "",
            "template": tokenizer.chat_template.source,
            "details": _details(card),
            "model_info": {
                "general.architecture": "llama",
                "general.name": card.name,
                "llama.block_count": card.n_layers,
                "llama.context_length": state.generator.context_length(card),
            },
            "capabilities": capabilities,
            "modified_at": _timestamp(state.created),
        }
    )


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "exo_version": __version__})


ROUTES = [
    web.post("/api/chat", chat),
    web.post("/api/generate", generate),
    web.get("/api/tags", tags),
    web.post("/api/show", show),
    web.get("/api/ps", ps),
    web.get("/api/version", version),
]


def error_body(error: APIError) -> dict[str, Any]:
    """Ollama's error shape: one message."""
    return {"error": error.message}
