"""Answering /v1/chat/completions and /v1/completions: choices run concurrently, streamed or whole.

Every choice is one `Generator.stream` (the path `exo run --prompt` uses too), run in its own
task; their chunks meet in one queue, in the order they are produced. A streamed response
sends its headers only with the first chunk, so anything that fails before that (no node,
an engine that cannot load) is an ordinary HTTP error; a failure after it is an SSE error
event followed by `data: [DONE]`. When the client goes away the handler is cancelled, which
cancels the choices' tasks and so closes their streams: every stage releases its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from exo_core.api import protocol, tools
from exo_core.api.protocol import APIError, ChatRequest, CompletionRequest, TokenLogprob
from exo_core.api.state import ApiState
from exo_core.api.tools import ToolStream
from exo_core.models.cards import ModelCard
from exo_core.models.tokenizer import Tokenizer, TokenizerError
from exo_core.node import constraints
from exo_core.node.generate import (
    ContextLengthError,
    PreparedRequest,
    TextChunk,
    TextRequest,
    Usage,
    token_bytes,
)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell reverse proxies not to buffer the stream
}
_DONE = b"data: [DONE]\n\n"
INLINE_PREPARE_CHARS = 8192  # longer prompts are tokenized on a worker thread

try:  # aiohttp >= 3.10 raises its own subclass when writing to a closed connection
    from aiohttp import ClientConnectionResetError as _ResetError
except ImportError:  # pragma: no cover
    _ResetError = ConnectionResetError  # type: ignore[misc,assignment]
_CLIENT_GONE = (ConnectionResetError, _ResetError)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


@dataclass
class Choice:
    """One generated answer of a response (index in `choices`), and what it has produced so far."""

    index: int
    prepared: PreparedRequest
    usage: Usage = field(default_factory=Usage)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    started: bool = False  # a streamed chat choice sends its role once
    has_first_token: bool = False
    text_offset: int = 0  # legacy logprobs: characters of this choice's text so far
    tools: ToolStream | None = None  # chat with tools: splits the answer into content and calls
    server_calls: list[dict[str, Any]] = field(default_factory=list)  # a whole-request server's calls
    counted_tokens: int = 0  # completion tokens already on the metric
    counted_done: bool = False  # its usage is on the metrics


class CompletionRun:
    """One API call: validate against the cluster, prepare every choice, then run them."""

    def __init__(self, state: ApiState, req: ChatRequest | CompletionRequest, endpoint: str) -> None:
        self.state = state
        self.req = req
        self.endpoint = endpoint
        self.is_chat = isinstance(req, ChatRequest)
        self.id = protocol.new_id("chatcmpl" if self.is_chat else "cmpl")
        self.created = protocol.now()
        self.arrived = time.perf_counter()
        self.choices: list[Choice] = []
        self.card: ModelCard | None = None
        self.want_logprobs = req.sampling.top_logprobs is not None
        self._token_counter: Any = None  # the model's completion-token counter, looked up once
        self._envelope: tuple[bytes, bytes] | None = None  # a chunk frame around its choice

    # ---- preparation ---------------------------------------------------------------------------

    async def respond(self, request: web.Request) -> web.StreamResponse:
        self.card = await self.state.resolve_model(self.req.model)
        self.state.check_servable(self.card)
        if (
            self.state.is_warm(self.card)
            and self._prompt_chars() <= INLINE_PREPARE_CHARS
            and not self._shapes_output()
        ):
            # A short prompt for a model whose tokenizer is loaded: tokenizing takes less than
            # the two thread hand-offs would add to the time to first token.
            self.choices = self._prepare_all(self.card)
        else:
            self.choices = await asyncio.to_thread(self._prepare_all, self.card)
            self.state.warm_models.add(self.card.id)
        metrics = self.state.metrics
        prompt_tokens = sum(len(c.prepared.prompt_tokens) for c in self._prompt_heads())
        metrics.prompt_tokens.labels(self.card.id).inc(prompt_tokens)
        metrics.active_requests.inc()
        try:
            if self.req.stream:
                return await self._stream(request)
            return web.json_response(await self._collect(), dumps=lambda o: _dumps(o).decode())
        finally:
            metrics.active_requests.dec()
            for choice in self.choices:  # answers cut short (client gone, failure) count too
                self._count_usage(choice)
            self._log_done()

    def _log_done(self) -> None:
        """One line per generation, after it ends (so logging adds nothing to its latency)."""
        first = [c.usage.first_token_s for c in self.choices if c.usage.first_token_s is not None]
        self.state.log.info(
            "generation",
            id=self.id,
            model=self._model_id,
            user=self.req.user,
            n=len(self.choices),
            stream=self.req.stream,
            prompt_tokens=self._usage()["prompt_tokens"],
            completion_tokens=self._usage()["completion_tokens"],
            finish=sorted({c.finish_reason or "cancelled" for c in self.choices}),
            first_token_ms=round(1000 * min(first), 1) if first else None,
            seconds=round(time.perf_counter() - self.arrived, 3),
        )

    def _shapes_output(self) -> bool:
        """Tools or a response format: preparing builds a grammar (on a thread)."""
        req = self.req
        return req.response_format is not None or (isinstance(req, ChatRequest) and bool(req.tools))

    def _output_plan(self, card: ModelCard) -> tuple[list[dict[str, Any]] | None, str | None, str | None]:
        """(tools the template renders, their call format, the grammar the sampler follows)."""
        req = self.req
        wants_tools = isinstance(req, ChatRequest) and bool(req.tools) and req.tool_choice != "none"
        if not wants_tools and req.response_format is None:
            return None, None, None
        if self.state.generator.node.origin.text_only(card):
            return None, None, None  # its servers get the fields (extra) and answer in their shape
        try:
            tokenizer: Tokenizer = self.state.generator.tokenizer(card)
        except (TokenizerError, OSError):
            return None, None, None  # a whole-request engine: its server gets the fields (extra)
        render, fmt, grammar, param = None, None, None, "response_format"
        if wants_tools:
            assert isinstance(req, ChatRequest) and req.tools
            template = tokenizer.chat_template
            if not template.supports_tools:
                raise APIError(
                    400,
                    f"the chat template of {card.id} has no tool support (it never renders `tools`); "
                    "use a model whose template does, or describe the tools in the prompt",
                    param="tools",
                    code="tools_not_supported",
                )
            fmt = tools.detect_format(template.source)
            if fmt is None:
                raise APIError(
                    400,
                    f"the chat template of {card.id} renders tools, but not in a call format exo parses "
                    "(<tool_call> JSON, or Llama 3.1 JSON function calls)",
                    param="tools",
                    code="tools_not_supported",
                )
            render = req.tools
            forced = req.forced_tools
            if forced:
                grammar, param = tools.call_grammar(fmt, forced, req.parallel_tool_calls), "tool_choice"
        if grammar is None and req.response_format is not None:
            schema = req.response_format.get("json_schema", {}).get("schema")
            grammar = constraints.json_schema_grammar(schema)
        if grammar is not None:
            try:
                constraints.check_grammar(grammar, tokenizer)
            except constraints.ConstraintError as exc:
                raise protocol.invalid(f"{param} cannot be followed: {exc}", param) from exc
        return render, fmt, grammar

    def _extra(self) -> dict[str, Any]:
        """The output-shaping fields, for whole-request engines whose servers take them."""
        req = self.req
        out: dict[str, Any] = {}
        if req.response_format is not None:
            out["response_format"] = req.response_format
        if isinstance(req, ChatRequest) and req.tools:
            out.update(
                tools=req.tools, tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls
            )
        return out

    def _prepare_all(self, card: ModelCard) -> list[Choice]:
        """Tokenize each prompt once (in a thread: the first use of a model reads its tokenizer)."""
        req = self.req
        try:
            render, fmt, grammar = self._output_plan(card)
        except constraints.ConstraintError as exc:
            raise protocol.invalid(str(exc), "response_format") from exc
        extra = self._extra()
        if isinstance(req, ChatRequest):
            bases = [
                TextRequest(
                    card,
                    messages=req.messages,
                    max_tokens=req.max_tokens,
                    stop=req.stop,
                    tools=render,
                    constraint=grammar,
                    extra=extra,
                )
            ]
        else:
            bases = [
                TextRequest(
                    card, prompt=p, max_tokens=req.max_tokens, stop=req.stop, constraint=grammar, extra=extra
                )
                for p in req.prompts
            ]
        choices: list[Choice] = []
        for base in bases:
            try:
                prepared = self.state.generator.prepare(base)
            except ContextLengthError:
                raise  # a ValueError too, but with its own code
            except ValueError as exc:  # e.g. a prompt that tokenizes to nothing
                raise protocol.invalid(str(exc), "messages" if self.is_chat else "prompt") from exc
            for i in range(req.n):
                text_req = dataclasses.replace(base, sampling=req.sampling_for_choice(i))
                one = PreparedRequest(
                    text_req, prepared.tokenizer, prepared.prompt_tokens, prepared.max_tokens
                )
                choices.append(Choice(len(choices), one, tools=ToolStream(fmt) if fmt else None))
        return choices

    def _prompt_chars(self) -> int:
        req = self.req
        if isinstance(req, ChatRequest):
            return sum(len(m["content"] or "") for m in req.messages)
        return sum(len(p) for p in req.prompts)

    def _prompt_heads(self) -> list[Choice]:
        """The first choice of each prompt (usage counts a prompt once however many choices it has)."""
        return self.choices[:: self.req.n]

    # ---- running the choices -------------------------------------------------------------------

    async def _events(self) -> AsyncGenerator[tuple[Choice, TextChunk], None]:
        """Chunks of every choice as they come; raises the first failure; closing it stops them all."""
        if len(self.choices) == 1:  # the common case, without a task and a queue between
            choice = self.choices[0]
            stream = self.state.generator.stream(choice.prepared, choice.usage)
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    self._account(choice, chunk)
                    yield choice, chunk
            return
        queue: asyncio.Queue[tuple[Choice, TextChunk | BaseException | None]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._drive(c, queue)) for c in self.choices]
        try:
            running = len(tasks)
            while running:
                choice, event = await queue.get()
                if event is None:
                    running -= 1
                elif isinstance(event, BaseException):
                    raise event
                else:
                    self._account(choice, event)
                    yield choice, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drive(
        self, choice: Choice, queue: asyncio.Queue[tuple[Choice, TextChunk | BaseException | None]]
    ) -> None:
        try:
            async with contextlib.aclosing(
                self.state.generator.stream(choice.prepared, choice.usage)
            ) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((choice, chunk))
            queue.put_nowait((choice, None))
        except Exception as exc:
            queue.put_nowait((choice, exc))

    def _account(self, choice: Choice, chunk: TextChunk) -> None:
        assert self.card is not None
        metrics = self.state.metrics
        model = self.card.id
        if not choice.has_first_token:
            choice.has_first_token = True
            metrics.time_to_first_token.labels(model).observe(time.perf_counter() - self.arrived)
        if self._token_counter is None:
            self._token_counter = metrics.completion_tokens.labels(model)
        self._token_counter.inc(len(chunk.tokens))
        choice.counted_tokens += len(chunk.tokens)
        if chunk.finish_reason is not None:
            choice.finish_reason = chunk.finish_reason
            self._count_usage(choice)
            usage = choice.usage
            if usage.cached_tokens and choice.index % self.req.n == 0:  # a prompt counts once
                metrics.cached_prompt_tokens.labels(model).inc(usage.cached_tokens)
            if usage.completion_tokens > 1 and usage.first_token_s is not None:
                decode_s = usage.elapsed_s - usage.first_token_s
                if decode_s > 0:
                    metrics.tokens_per_second.labels(model).observe((usage.completion_tokens - 1) / decode_s)

    def _count_usage(self, choice: Choice) -> None:
        """Put what the token stream did not show on the metrics, once: a whole-request server's
        answer arrives as text, counted by its usage (the server's counts, or an estimate)."""
        if choice.counted_done or self.card is None:
            return
        choice.counted_done = True
        metrics, usage = self.state.metrics, choice.usage
        if usage.completion_tokens > choice.counted_tokens:
            metrics.completion_tokens.labels(self.card.id).inc(
                usage.completion_tokens - choice.counted_tokens
            )
            choice.counted_tokens = usage.completion_tokens
        if not choice.prepared.prompt_tokens and choice.index % self.req.n == 0 and usage.prompt_tokens:
            metrics.prompt_tokens.labels(self.card.id).inc(usage.prompt_tokens)  # not tokenized here

    def _token_logprobs(self, choice: Choice, chunk: TextChunk) -> list[TokenLogprob]:
        if not self.want_logprobs:
            return []
        tokenizer = choice.prepared.tokenizer
        if tokenizer is None or (chunk.text and not chunk.tokens):  # a whole-request server's text
            raise APIError(
                400,
                "logprobs are not available: the engine serving this model samples by itself",
                param="logprobs",
                code="unsupported_parameter",
            )
        out = []
        for tok in chunk.tokens:
            if tok.finish_reason == "stop" and tok.token in tokenizer.eos_token_ids:
                continue  # the end-of-turn token is not part of the answer
            if tok.logprob is None:
                raise APIError(
                    400,
                    "logprobs are not available: the engine serving this model samples by itself",
                    param="logprobs",
                    code="unsupported_parameter",
                )
            top = tuple((token_bytes(tokenizer, t), lp) for t, lp in tok.top_logprobs)
            out.append(TokenLogprob(token_bytes(tokenizer, tok.token), tok.logprob, top))
        return out

    def _usage(self) -> dict[str, Any]:
        prompt = sum(c.usage.prompt_tokens for c in self._prompt_heads())
        completion = sum(c.usage.completion_tokens for c in self.choices)
        cached = sum(c.usage.cached_tokens for c in self._prompt_heads())
        return protocol.usage_body(prompt, completion, cached)

    # ---- the answer's text (tool calls are taken out of it) -------------------------------------

    def feed_text(self, choice: Choice, chunk: TextChunk) -> None:
        """Keep a chunk of a whole (unstreamed) answer."""
        self.stream_text(choice, chunk)

    def stream_text(self, choice: Choice, chunk: TextChunk) -> str:
        """The content of a chunk to stream now (tool calls are held back and parsed)."""
        choice.text.append(chunk.text)
        choice.server_calls.extend(
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in chunk.tool_calls
        )
        if choice.tools is None:
            return chunk.text
        text, _ = choice.tools.feed(chunk.text)
        if chunk.finish_reason is not None:
            more, _ = choice.tools.finish()
            text += more
        return text

    def final_text(self, choice: Choice) -> str:
        """The whole answer's content."""
        if choice.tools is not None:
            return choice.tools.text or ""
        return "".join(choice.text)

    def tool_calls_of(self, choice: Choice) -> list[dict[str, Any]]:
        """The tool calls of the answer so far, in OpenAI's shape: a whole-request server's, then
        those parsed from the text (only the first one when `parallel_tool_calls` is false)."""
        calls = choice.server_calls + (choice.tools.calls if choice.tools is not None else [])
        if isinstance(self.req, ChatRequest) and not self.req.parallel_tool_calls:
            return calls[:1]
        return calls

    def finish_reason_of(self, choice: Choice, reason: str | None) -> str | None:
        """'tool_calls' when an answer that ended by itself called tools."""
        if reason == "stop" and self.tool_calls_of(choice):
            return "tool_calls"
        if reason == "tool_calls" and not self.tool_calls_of(choice):
            return "stop"  # a server that said so but sent no call
        return reason

    # ---- whole responses -------------------------------------------------------------------------

    async def _collect(self) -> dict[str, Any]:
        async with contextlib.aclosing(self._events()) as events:
            async for choice, chunk in events:
                self.feed_text(choice, chunk)
                choice.logprobs.extend(self._token_logprobs(choice, chunk))
        return {
            "id": self.id,
            "object": "chat.completion" if self.is_chat else "text_completion",
            "created": self.created,
            "model": self._model_id,
            "system_fingerprint": self.state.fingerprint,
            "choices": [self._whole_choice(c) for c in self.choices],
            "usage": self._usage(),
        }

    @property
    def _model_id(self) -> str:
        assert self.card is not None
        return self.card.id

    def _whole_choice(self, choice: Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        if isinstance(self.req, ChatRequest):
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if choice.tools is not None:
                message["content"] = choice.tools.text
            calls = self.tool_calls_of(choice)
            if calls:
                message["tool_calls"] = calls
                message["content"] = message["content"] or None
            return {
                "index": choice.index,
                "message": message,
                "logprobs": protocol.chat_logprobs(choice.logprobs) if self.want_logprobs else None,
                "finish_reason": self.finish_reason_of(choice, choice.finish_reason),
            }
        prompt = self._echo(choice)
        return {
            "index": choice.index,
            "text": prompt + text,
            "logprobs": protocol.completion_logprobs(choice.logprobs, 0) if self.want_logprobs else None,
            "finish_reason": choice.finish_reason,
        }

    def _echo(self, choice: Choice) -> str:
        req = self.req
        if isinstance(req, CompletionRequest) and req.echo:
            return req.prompts[choice.index // req.n]
        return ""

    # ---- streamed responses ----------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            async with contextlib.aclosing(self._events()) as events:
                async for choice, chunk in events:
                    frames = self._frames(choice, chunk)
                    if response is None:
                        response = web.StreamResponse(headers=SSE_HEADERS)
                        await response.prepare(request)
                    await response.write(frames)
            if response is None:  # nothing was generated at all (cannot happen with n >= 1)
                response = web.StreamResponse(headers=SSE_HEADERS)
                await response.prepare(request)
            if self.req.include_usage:
                await response.write(sse(self._frame_base(choices=[], usage=self._usage())))
            await response.write(_DONE)
        except _CLIENT_GONE:
            self.state.log.info("client went away", request=self.id)
        except Exception as exc:
            if response is None:
                raise  # nothing sent yet: an ordinary HTTP error
            error = self.state.api_error(exc, self.endpoint)
            with contextlib.suppress(*_CLIENT_GONE):
                await response.write(sse(error.body()) + _DONE)
        assert response is not None
        return response

    def _frame_base(self, **extra: Any) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.is_chat else "text_completion",
            "created": self.created,
            "model": self._model_id,
            "system_fingerprint": self.state.fingerprint,
            **extra,
        }
        if self.req.include_usage and "usage" not in body:
            body["usage"] = None
        return body

    def _frames(self, choice: Choice, chunk: TextChunk) -> bytes:
        """The SSE frames for one chunk: its text (with logprobs), then the finish when it ends."""
        logprobs = self._token_logprobs(choice, chunk)
        out = b""
        if isinstance(self.req, ChatRequest):
            delta: dict[str, Any] = {}
            if not choice.started:
                choice.started = True
                delta["role"] = "assistant"
            before = len(self.tool_calls_of(choice))
            text = self.stream_text(choice, chunk)
            if text or logprobs or delta:
                delta["content"] = text
                lp = protocol.chat_logprobs(logprobs) if self.want_logprobs else None
                out += self._chunk_frame(self._chat_choice(choice, delta, lp, None))
            for k, call in enumerate(self.tool_calls_of(choice)[before:], start=before):
                call_delta = {"tool_calls": [{"index": k, **call}]}
                out += self._chunk_frame(self._chat_choice(choice, call_delta, None, None))
            if chunk.finish_reason is not None:
                finish = self.finish_reason_of(choice, chunk.finish_reason)
                out += self._chunk_frame(self._chat_choice(choice, {}, None, finish))
            return out
        text = chunk.text
        if not choice.started:
            choice.started = True
            text = self._echo(choice) + text
        if text or logprobs:
            lp = protocol.completion_logprobs(logprobs, choice.text_offset) if self.want_logprobs else None
            choice.text_offset += len(text)
            out += self._chunk_frame(self._text_choice(choice, text, lp, None))
        if chunk.finish_reason is not None:
            out += self._chunk_frame(self._text_choice(choice, "", None, chunk.finish_reason))
        return out

    def _chunk_frame(self, choice: dict[str, Any]) -> bytes:
        """One SSE frame holding one choice; the envelope is the same for every frame, so it is
        serialised once."""
        if self._envelope is None:
            empty = _dumps(self._frame_base(choices=[]))
            cut = empty.index(b'"choices":[') + len(b'"choices":[')
            self._envelope = (b"data: " + empty[:cut], empty[cut:] + b"\n\n")
        head, tail = self._envelope
        return head + _dumps(choice) + tail

    @staticmethod
    def _chat_choice(choice: Choice, delta: dict, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    @staticmethod
    def _text_choice(choice: Choice, text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
