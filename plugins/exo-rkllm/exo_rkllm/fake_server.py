"""A stand-in RKLLAMA server: both dialects of RKLLAMA_API.md, quirks included, with fault injection.

It is a real aiohttp HTTP server, so the bridge is tested over real sockets. Answers are
deterministic (`fake_answer`): a fixed text with multi-byte characters that echoes the last
user message, streamed one piece (a "token") at a time at `tokens_per_second` after
`first_token_ms`. Every JSON object is written in two network writes with a pause between,
cut inside a multi-byte UTF-8 character when there is one, so clients see objects and
characters split across reads.

Quirks kept on purpose:
- fork: one model loaded at a time; `/generate` answers HTML 500 to a `system` turn (the server
  adds its own) or to roles that do not alternate user/assistant; the stream is `text/plain`
  JSON objects separated by blank lines with no final chunk; non-streaming requests are
  serialised, while concurrent streams share the runtime and garble each other (the state
  records `max_concurrent` so tests can check the bridge never does that).
- upstream: `/api/chat` streams NDJSON (stream defaults to true) ending in a `done` chunk
  whose prompt/eval durations are milliseconds; requests queue FIFO per model; a request that
  waits longer than `abort_timeout_s` (300 s on the real server) is aborted with the abort text
  (non-streaming) or a `done` chunk with zero counts (streaming).

Every request is recorded (`FakeRKLLAMA.requests`, or `GET /_fake/requests`); faults are set
in-process (`server.faults.append(Fault(...))`), over HTTP (`POST /_fake/faults`), or on the
command line (`--fault cut:3`). Run it with
`python -m exo_rkllm.fake_server --dialect fork|upstream --port N --tokens-per-second 16 --first-token-ms 200`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

DIALECTS = ("fork", "upstream")
FAULT_KINDS = (
    "http500",
    "http4xx",
    "abort",
    "abort_text",
    "cut",
    "cut_mid",
    "load_failure",
    "garbage",
    "stall",
)
DEFAULT_MODELS = (
    "SmolLM2-135M-Instruct",
    "Qwen2.5-0.5B",
    "Qwen2.5-1.5B",
    "Qwen2.5-3B",
    "Qwen2.5-7B",
    "DeepSeek-R1-1.5B",
    "DeepSeek-R1-7B",
    "Llama-3.2-1B",
    "Llama-3.2-3B",
    "Phi-3-mini",
    "TinyLlama-1.1B",
)
ABORT_TEXT = "Aborted inference by Timeout ({seconds} seconds). Try again."
FORK_SYSTEM_PROMPT = "You are a helpful assistant running on a Rockchip NPU."
INVALID_JSON_FR = "Données JSON invalides !"

_FLASK_PAGE = (
    "<!doctype html>\n<html lang=en>\n<title>{code} {title}</title>\n<h1>{title}</h1>\n<p>{text}</p>\n"
)
FLASK_500 = _FLASK_PAGE.format(
    code=500,
    title="Internal Server Error",
    text="The server encountered an internal error and was unable to complete your request. "
    "Either the server is overloaded or there is an error in the application.",
)
FLASK_404 = _FLASK_PAGE.format(
    code=404,
    title="Not Found",
    text="The requested URL was not found on the server. If you entered the URL manually please "
    "check your spelling and try again.",
)

_ANSWER = (
    "Voilà ! Réponse déterministe : naïve café, 日本語のテキスト, Ελληνικά, emoji 🚀🎉👩‍💻 — "
    "you said «{echo}» ({turns} messages)."
)


def fake_answer(messages: Sequence[dict[str, Any]], repeat: int = 1, fixed: str | None = None) -> str:
    """The stand-in's answer to a conversation (tests compute the expected text with it)."""
    if fixed is not None:
        return fixed * repeat
    last_user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
    echo = " ".join(last_user.split())[:60]
    return " ".join([_ANSWER.format(echo=echo, turns=len(messages))] * repeat)


_PIECE = re.compile(r"\s*\S{1,4}|\s+")


def answer_pieces(text: str) -> list[str]:
    """The answer cut into token-sized pieces (whole characters; concatenated they are the text)."""
    return _PIECE.findall(text)


@dataclass
class Fault:
    """A failure to inject: what, after how many streamed pieces, how many requests it hits."""

    kind: str
    after: int = 0
    status: int = 400
    message: str = "bad request (injected)"
    times: int | None = None  # None: every request until cleared

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; choose one of: {', '.join(FAULT_KINDS)}")

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """`kind`, `kind:after` or `kind:after:times` (command-line form)."""
        kind, *rest = spec.split(":")
        after = int(rest[0]) if rest else 0
        times = int(rest[1]) if len(rest) > 1 else None
        return cls(kind, after=after, times=times)


@dataclass
class FakeConfig:
    """How the stand-in behaves."""

    dialect: str = "fork"
    models: tuple[str, ...] = DEFAULT_MODELS  # used when models_dir is None
    models_dir: Path | None = None  # folders holding a .rkllm file (and a Modelfile to load)
    tokens_per_second: float = 16.0
    first_token_ms: float = 200.0
    load_ms: float = 0.0
    abort_timeout_s: float = 300.0
    answer: str | None = None  # fixed answer text instead of fake_answer's
    answer_repeat: int = 1
    split_writes: bool = True
    split_pause_ms: float = 1.0
    ensure_ascii: bool = False
    version: str = "0.0.74"

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {self.dialect!r}; choose one of: {', '.join(DIALECTS)}")


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: Any  # parsed JSON, else the text, else None
    at: float  # time.monotonic() on arrival

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _State:
    loaded: list[str] = field(default_factory=list)
    active: int = 0
    max_concurrent: int = 0
    generations: int = 0


class FakeRKLLAMA:
    """The stand-in server; `async with FakeRKLLAMA(dialect="upstream") as server: server.url`."""

    def __init__(self, config: FakeConfig | None = None, **overrides: Any) -> None:
        self.config = config or FakeConfig(**overrides)
        if config is not None and overrides:
            raise TypeError("give a FakeConfig or keyword settings, not both")
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.state = _State()
        self._fork_lock = asyncio.Lock()  # serialises non-streaming /generate
        self._model_queues: dict[str, asyncio.Lock] = {}  # upstream: FIFO per model
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.app = self._make_app()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        self.url = f"http://{host}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeRKLLAMA:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- what tests look at ----------------------------------------------------------------

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def generation_requests(self) -> list[RecordedRequest]:
        paths = ("/generate", "/api/chat", "/v1/chat/completions")
        return [r for r in self.requests if r.path in paths]

    def reset(self) -> None:
        """Forget recorded requests and faults (models stay loaded)."""
        self.requests.clear()
        self.faults.clear()
        self.state.max_concurrent = self.state.active

    # ---- the application -------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record, self._flask_errors])
        app.router.add_get("/", self._welcome)
        app.router.add_get("/_fake/requests", self._fake_requests)
        app.router.add_delete("/_fake/requests", self._fake_clear)
        app.router.add_post("/_fake/faults", self._fake_add_fault)
        app.router.add_delete("/_fake/faults", self._fake_clear_faults)
        app.router.add_get("/_fake/state", self._fake_state)
        if self.config.dialect == "fork":
            app.router.add_get("/models", self._fork_models)
            app.router.add_get("/current_model", self._fork_current)
            app.router.add_post("/load_model", self._fork_load)
            app.router.add_post("/unload_model", self._fork_unload)
            app.router.add_post("/generate", self._fork_generate)
        else:
            app.router.add_get("/api/version", self._up_version)
            app.router.add_get("/api/tags", self._up_tags)
            app.router.add_get("/api/ps", self._up_ps)
            app.router.add_post("/api/chat", self._up_chat)
            app.router.add_post("/v1/chat/completions", self._up_openai)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/_fake/"):
            raw = await request.read()
            body: Any = None
            if raw:
                text = raw.decode("utf-8", "replace")
                try:
                    body = json.loads(text)
                except ValueError:
                    body = text
            self.requests.append(RecordedRequest(request.method, request.path, body, time.monotonic()))
        return await handler(request)

    @web.middleware
    async def _flask_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.Response(status=404, text=FLASK_404, content_type="text/html")
        except web.HTTPMethodNotAllowed:
            return web.Response(status=405, text=FLASK_404, content_type="text/html")

    async def _welcome(self, request: web.Request) -> web.Response:
        return web.json_response({"message": "Welcome to RKLLama!", "github": "stand-in"})

    async def _fake_requests(self, request: web.Request) -> web.Response:
        return web.json_response([r.to_dict() for r in self.requests])

    async def _fake_clear(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({"cleared": True})

    async def _fake_add_fault(self, request: web.Request) -> web.Response:
        try:
            fault = Fault(**await request.json())
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.faults.append(fault)
        return web.json_response(asdict(fault))

    async def _fake_clear_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return web.json_response({"cleared": True})

    async def _fake_state(self, request: web.Request) -> web.Response:
        return web.json_response({**asdict(self.state), "dialect": self.config.dialect})

    # ---- shared pieces ---------------------------------------------------------------------

    def _models(self) -> list[str] | None:
        """Model folder names, or None when the models directory is missing."""
        base = self.config.models_dir
        if base is None:
            return list(self.config.models)
        if not base.is_dir():
            return None
        return sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.rkllm")))

    def _has_modelfile(self, name: str) -> bool:
        base = self.config.models_dir
        return base is None or (base / name / "Modelfile").is_file()

    def _take_fault(self, *kinds: str) -> Fault | None:
        for fault in self.faults:
            if fault.kind in kinds:
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def _answer(self, messages: list[dict[str, Any]]) -> list[str]:
        cfg = self.config
        return answer_pieces(fake_answer(messages, cfg.answer_repeat, cfg.answer))

    def _dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=self.config.ensure_ascii).encode("utf-8")

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        """One object in two network writes, cut inside a multi-byte character when there is one."""
        if not self.config.split_writes or len(data) < 2:
            await resp.write(data)
            return
        lead = next((i for i, b in enumerate(data) if b >= 0xC0), None)
        cut = lead + 1 if lead is not None else len(data) // 2
        await resp.write(data[:cut])
        await asyncio.sleep(self.config.split_pause_ms / 1000.0)
        await resp.write(data[cut:])

    async def _pace(self, start: float, index: int) -> None:
        """Sleep until piece `index` is due: first_token_ms after start, then 1/tokens_per_second each."""
        cfg = self.config
        due = start + cfg.first_token_ms / 1000.0 + index / max(cfg.tokens_per_second, 1e-6)
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def _enter_generation(self) -> None:
        self.state.active += 1
        self.state.generations += 1
        self.state.max_concurrent = max(self.state.max_concurrent, self.state.active)

    def _leave_generation(self) -> None:
        self.state.active -= 1

    def _injected_error(self) -> web.Response | None:
        fault = self._take_fault("http500", "http4xx")
        if fault is None:
            return None
        if fault.kind == "http500":
            return web.Response(status=500, text=FLASK_500, content_type="text/html")
        return web.json_response({"error": fault.message}, status=fault.status)

    @staticmethod
    def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
        return 1 + sum(len(str(m.get("content", ""))) for m in messages) // 4

    # ---- dialect A: the fork ---------------------------------------------------------------

    async def _fork_models(self, request: web.Request) -> web.Response:
        models = self._models()
        if models is None:
            return web.Response(status=500, text=FLASK_500, content_type="text/html")
        return web.json_response({"models": models})

    async def _fork_current(self, request: web.Request) -> web.Response:
        if not self.state.loaded:
            return web.json_response({"error": "No models are currently loaded."}, status=404)
        return web.json_response({"model_name": self.state.loaded[0]})

    async def _fork_load(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        name = body.get("model_name") if isinstance(body, dict) else None
        if not name:
            return web.json_response(
                {"error": "Please enter the name of the model to be loaded."}, status=400
            )
        if self.state.loaded:
            return web.json_response(
                {"error": "A model is already loaded. Please unload it first."}, status=400
            )
        models = self._models() or []
        if name not in models:
            return web.json_response({"error": f"Model directory '{name}' not found."}, status=400)
        if not self._has_modelfile(name):
            return web.json_response({"error": f"Modelfile not found in '{name}' directory."}, status=400)
        if self._take_fault("load_failure"):
            return web.Response(status=500, text=FLASK_500, content_type="text/html")
        await asyncio.sleep(self.config.load_ms / 1000.0)
        self.state.loaded = [name]
        return web.json_response({"message": f"Model {name} loaded successfully."})

    async def _fork_unload(self, request: web.Request) -> web.Response:
        if not self.state.loaded:
            return web.json_response({"error": "No models are currently loaded."}, status=400)
        self.state.loaded = []
        return web.json_response({"message": "Model successfully unloaded!"})

    async def _fork_generate(self, request: web.Request) -> web.StreamResponse:
        if not self.state.loaded:
            return web.json_response({"error": "No models are currently loaded."}, status=400)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "messages" not in body:
            return web.json_response({"status": "error", "message": INVALID_JSON_FR}, status=400)
        messages = body["messages"]
        if not _fork_template_accepts(messages):
            return web.Response(status=500, text=FLASK_500, content_type="text/html")
        injected = self._injected_error()
        if injected is not None:
            return injected
        pieces = self._answer(messages)
        if not body.get("stream", False):
            async with self._fork_lock:
                return await self._fork_complete(messages, pieces)
        return await self._fork_stream(request, messages, pieces)

    def _fork_chunk(self, content: str, messages: list[dict[str, Any]], completion: int) -> dict[str, Any]:
        prompt = self._prompt_tokens(messages)
        return {
            "id": "rkllm_chat",
            "object": "rkllm_chat",
            "created": None,
            "choices": [{"role": "assistant", "content": content, "logprobs": None, "finish_reason": None}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "tokens_per_second": self.config.tokens_per_second,
                "total_tokens": prompt + completion,
            },
        }

    async def _fork_complete(self, messages: list[dict[str, Any]], pieces: list[str]) -> web.Response:
        self._enter_generation()
        try:
            start = time.monotonic()
            await self._pace(start, len(pieces) - 1)
        finally:
            self._leave_generation()
        chunk = self._fork_chunk("".join(pieces), messages, len(pieces))
        chunk["choices"][0]["finish_reason"] = "stop"
        return web.Response(body=self._dumps(chunk), content_type="application/json")

    async def _fork_stream(
        self, request: web.Request, messages: list[dict[str, Any]], pieces: list[str]
    ) -> web.StreamResponse:
        fault = self._take_fault("cut", "cut_mid", "garbage", "stall")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self._enter_generation()
        try:
            start = time.monotonic()
            for i, piece in enumerate(pieces):
                if self.state.active > 1 and i % 2:
                    continue  # another stream shares the runtime handle: pieces go astray
                await self._pace(start, i)
                data = self._dumps(self._fork_chunk(piece, messages, i + 1)) + b"\n\n"
                if fault is not None and i >= fault.after:
                    return await self._stream_fault(request, resp, fault, data, b"\xff<garbage> not json\n\n")
                await self._write(resp, data)
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            return resp  # the client went away: the generation stops with it
        finally:
            self._leave_generation()

    async def _stream_fault(
        self, request: web.Request, resp: web.StreamResponse, fault: Fault, data: bytes, garbage: bytes
    ) -> web.StreamResponse:
        """Cut the connection (at an object boundary or inside one), send garbage, or stall."""
        if fault.kind == "garbage":
            await self._write(resp, garbage)
            await resp.write_eof()
            return resp
        if fault.kind == "stall":
            await asyncio.sleep(3600)
        if fault.kind == "cut_mid":
            await resp.write(data[: len(data) // 2])
            await asyncio.sleep(0.01)
        if request.transport is not None:
            request.transport.abort()
        return resp

    # ---- dialect B: upstream ---------------------------------------------------------------

    async def _up_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.config.version})

    def _model_entry(self, name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 1_000_000_000,
            "digest": digest,
            "details": {
                "format": "rkllm",
                "family": name.split("-")[0].lower(),
                "parameter_size": "",
                "quantization_level": "w8a8",
            },
        }

    async def _up_tags(self, request: web.Request) -> web.Response:
        models = self._models() or []
        return web.json_response({"models": [self._model_entry(n) for n in models]})

    async def _up_ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [self._model_entry(n) for n in self.state.loaded]})

    async def _up_prepare(self, body: Any) -> tuple[str, list[dict[str, Any]]] | web.Response:
        if not isinstance(body, dict):
            return web.json_response({"error": "Invalid JSON body"}, status=400)
        name, messages = body.get("model"), body.get("messages")
        if not name:
            return web.json_response({"error": "Missing 'model' parameter"}, status=400)
        if not isinstance(messages, list) or not messages:
            return web.json_response({"error": "Missing 'messages' parameter"}, status=400)
        if name not in (self._models() or []):
            return web.json_response({"error": f"Model '{name}' not found"}, status=404)
        injected = self._injected_error()
        if injected is not None:
            return injected
        if name not in self.state.loaded:
            if self._take_fault("load_failure"):
                return web.json_response(
                    {"error": f"Failed to load model '{name}': RKLLM runtime init failed (injected)"},
                    status=500,
                )
            await asyncio.sleep(self.config.load_ms / 1000.0)
            self.state.loaded.append(name)
        return name, messages

    async def _up_chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_or_none(request)
        prepared = await self._up_prepare(body)
        if isinstance(prepared, web.Response):
            return prepared
        name, messages = prepared
        stream = body.get("stream", True)
        pieces = self._limit(self._answer(messages), body.get("options"))
        return await self._up_run(request, name, messages, pieces, stream, openai=False)

    async def _up_openai(self, request: web.Request) -> web.StreamResponse:
        body = await _json_or_none(request)
        prepared = await self._up_prepare(body)
        if isinstance(prepared, web.Response):
            return prepared
        name, messages = prepared
        stream = body.get("stream", False)
        pieces = self._limit(self._answer(messages), {"num_predict": body.get("max_tokens")})
        return await self._up_run(request, name, messages, pieces, stream, openai=True)

    @staticmethod
    def _limit(pieces: list[str], options: Any) -> list[str]:
        limit = options.get("num_predict") if isinstance(options, dict) else None
        return pieces[:limit] if isinstance(limit, int) and limit >= 0 else pieces

    async def _up_run(
        self,
        request: web.Request,
        name: str,
        messages: list[dict[str, Any]],
        pieces: list[str],
        stream: bool,
        *,
        openai: bool,
    ) -> web.StreamResponse:
        queue = self._model_queues.setdefault(name, asyncio.Lock())
        arrived = time.monotonic()
        fault = self._take_fault("abort", "abort_text", "cut", "cut_mid", "garbage", "stall")
        acquired = False
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.abort_timeout_s):
                    await queue.acquire()
                    acquired = True
            fmt = _OpenAIFormat(name) if openai else _OllamaFormat(name)
            if not stream:
                return await self._up_complete(messages, pieces, fmt, fault, not acquired, arrived)
            return await self._up_stream(request, messages, pieces, fmt, fault, not acquired, arrived)
        finally:
            if acquired:
                queue.release()

    async def _up_stream(
        self,
        request: web.Request,
        messages: list[dict[str, Any]],
        pieces: list[str],
        fmt: _OllamaFormat | _OpenAIFormat,
        fault: Fault | None,
        aborted: bool,
        arrived: float,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": fmt.content_type})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        start = time.monotonic()
        self._enter_generation()
        try:
            for i, piece in enumerate(pieces):
                if aborted:
                    break
                if fault is not None and i >= fault.after:
                    if fault.kind not in ("abort", "abort_text"):
                        garbage = b"\xff<garbage> not json\n"
                        return await self._stream_fault(request, resp, fault, fmt.piece(piece), garbage)
                    # The runtime stops answering; the server gives up after its timeout.
                    await asyncio.sleep(self.config.abort_timeout_s)
                    if fault.kind == "abort_text":
                        text = ABORT_TEXT.format(seconds=int(self.config.abort_timeout_s))
                        await self._write(resp, fmt.piece(text))
                    aborted = True
                    break
                await self._pace(start, i)
                await self._write(resp, fmt.piece(piece))
            prompt = 0 if aborted else self._prompt_tokens(messages)
            count = 0 if aborted else len(pieces)
            await self._write(resp, fmt.final(prompt, count, start, arrived, aborted))
            await resp.write_eof()
            return resp
        except ConnectionResetError:
            return resp  # the client went away: the generation stops with it
        finally:
            self._leave_generation()

    async def _up_complete(
        self,
        messages: list[dict[str, Any]],
        pieces: list[str],
        fmt: _OllamaFormat | _OpenAIFormat,
        fault: Fault | None,
        aborted: bool,
        arrived: float,
    ) -> web.Response:
        start = time.monotonic()
        text = ""
        if not aborted:
            self._enter_generation()
            try:
                limit = len(pieces)
                if fault is not None and fault.kind in ("abort", "abort_text"):
                    limit = min(limit, fault.after)
                await self._pace(start, limit - 1)
                text = "".join(pieces[:limit])
                if limit < len(pieces):
                    await asyncio.sleep(self.config.abort_timeout_s)
                    aborted = True
            finally:
                self._leave_generation()
        if aborted:
            text += ABORT_TEXT.format(seconds=int(self.config.abort_timeout_s))
        prompt = 0 if aborted else self._prompt_tokens(messages)
        return web.Response(
            body=self._dumps(fmt.complete(text, prompt, len(pieces), start, arrived)),
            content_type="application/json",
        )


class _OllamaFormat:
    content_type = "application/x-ndjson"

    def __init__(self, model: str) -> None:
        self.model = model

    def _base(self, content: str, done: bool) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": content},
            "done": done,
        }

    def piece(self, text: str) -> bytes:
        return _dumps_line(self._base(text, False))

    def final(self, prompt: int, count: int, start: float, arrived: float, aborted: bool) -> bytes:
        return _dumps_line({**self._base("", True), **_durations(prompt, count, start, arrived, aborted)})

    def complete(self, text: str, prompt: int, count: int, start: float, arrived: float) -> dict[str, Any]:
        return {**self._base(text, True), **_durations(prompt, count, start, arrived, prompt == 0)}


class _OpenAIFormat:
    content_type = "text/event-stream"

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"chatcmpl-{int(time.time() * 1000)}"

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def piece(self, text: str) -> bytes:
        return (
            b"data: "
            + json.dumps(self._chunk({"content": text}, None), ensure_ascii=False).encode()
            + b"\n\n"
        )

    def final(self, prompt: int, count: int, start: float, arrived: float, aborted: bool) -> bytes:
        last = json.dumps(self._chunk({}, "stop")).encode()
        return b"data: " + last + b"\n\ndata: [DONE]\n\n"

    def complete(self, text: str, prompt: int, count: int, start: float, arrived: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count},
        }


def _durations(prompt: int, count: int, start: float, arrived: float, aborted: bool) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "done_reason": "stop",
        "total_duration": int((now - arrived) * 1e9),
        "load_duration": int(0.1 * 1e9),
        "prompt_eval_count": prompt,
        # RKLLAMA's known bug: these two are milliseconds, not nanoseconds.
        "prompt_eval_duration": None if aborted else int((now - start) * 100),
        "eval_count": count,
        "eval_duration": None if aborted else int((now - start) * 900),
    }


def _fork_template_accepts(messages: Any) -> bool:
    """The fork's chat template: its own system turn first, then strictly user/assistant/user/..."""
    if not isinstance(messages, list) or not messages:
        return False
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != ("user" if i % 2 == 0 else "assistant"):
            return False
    return True


async def _json_or_none(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dumps_line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


# ---- command line ------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m exo_rkllm.fake_server", description=__doc__.splitlines()[0])
    p.add_argument("--dialect", choices=DIALECTS, default="fork")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed on stdout)")
    p.add_argument("--tokens-per-second", type=float, default=16.0)
    p.add_argument("--first-token-ms", type=float, default=200.0)
    p.add_argument("--load-ms", type=float, default=0.0, help="time a model load takes")
    p.add_argument("--abort-timeout-s", type=float, default=300.0, help="the server's runtime wait limit")
    p.add_argument("--models-dir", type=Path, help="folders with a .rkllm file (default: a built-in list)")
    p.add_argument("--model", action="append", help="a model folder name (repeatable; replaces the list)")
    p.add_argument("--answer", help="a fixed answer text instead of the echoing one")
    p.add_argument("--answer-repeat", type=int, default=1, help="repeat the answer this many times")
    p.add_argument("--no-split", action="store_true", help="write each object in one network write")
    p.add_argument("--ensure-ascii", action="store_true", help="escape non-ASCII in JSON (\\u00e9)")
    p.add_argument(
        "--fault", action="append", default=[], help=f"KIND[:AFTER[:TIMES]], KIND in {FAULT_KINDS}"
    )
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    config = FakeConfig(
        dialect=args.dialect,
        models=tuple(args.model) if args.model else DEFAULT_MODELS,
        models_dir=args.models_dir,
        tokens_per_second=args.tokens_per_second,
        first_token_ms=args.first_token_ms,
        load_ms=args.load_ms,
        abort_timeout_s=args.abort_timeout_s,
        answer=args.answer,
        answer_repeat=args.answer_repeat,
        split_writes=not args.no_split,
        ensure_ascii=args.ensure_ascii,
    )
    server = FakeRKLLAMA(config)
    server.faults.extend(Fault.parse(spec) for spec in args.fault)
    url = await server.start(args.host, args.port)
    print(f"fake RKLLAMA ({args.dialect}) listening on {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


@contextlib.contextmanager
def in_subprocess(*args: str, timeout: float = 30.0) -> Iterator[str]:
    """The stand-in in its own process (its own event loop, like a board's server); yields its URL.

    `args` are command-line options (`"--dialect", "upstream", ...`); the port is picked free.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "exo_rkllm.fake_server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not ready or "listening on " not in ready[0]:
            raise RuntimeError(f"the stand-in RKLLAMA server did not start: {ready}")
        yield ready[0].rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
