"""Text in, text out: the one generation path behind the API and `exo run --prompt`.

It renders the chat template, tokenizes, checks the context, runs the node's token stream,
decodes it without splitting characters, and applies stop strings (never emitting them, even
when they arrive split over several tokens) and `max_tokens`.

A model served whole by text engines (RKLLAMA boards, OpenAI-compatible upstreams) needs no
tokenizer here: the request goes to a replica as text and its answer comes back as text. When
the model's tokenizer is on this node it is still used, to check the context and to count
tokens a server does not report; without it, usage is the server's own counts, or an estimate
of one token per 4 characters when the server gives none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from tokenizers import decoders

from exo_core.engine import TextDelta, TextGeneration, ToolCall
from exo_core.models.cards import ModelCard
from exo_core.models.files import ModelFilesError
from exo_core.models.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from exo_core.node.messages import GeneratedToken, GenerationRequest
from exo_core.node.node import Node
from exo_core.node.origin import RING
from exo_core.node.sampling import SamplingParams


class ContextLengthError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context.

    `param` names the request field to shorten: the prompt ("messages"/"prompt") or "max_tokens".
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class TextRequest:
    model: ModelCard
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | None = None  # plain completion
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # OpenAI fields core does not interpret, for whole-request engines whose servers take them.
    extra: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template's `tools`
    constraint: str | None = None  # an llguidance grammar the sampler follows (node/constraints.py)


@dataclass
class PreparedRequest:
    """A request ready to run. Without a tokenizer on this node (a model served whole by text
    engines) `tokenizer` is None, `prompt_tokens` empty and `max_tokens` the request's own."""

    text_request: TextRequest
    tokenizer: Tokenizer | None
    prompt_tokens: list[int]
    max_tokens: int | None


@dataclass
class TextChunk:
    """New text and the tokens that produced it; the last chunk has a finish reason.

    `tool_calls` are the calls a whole-request server answered with (on the last chunk); a
    model run here writes its calls as text, which the API parses.
    """

    text: str
    tokens: list[GeneratedToken]
    finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    elapsed_s: float = 0.0
    cached_tokens: int = 0  # prompt positions the stages took from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Generator:
    """Runs text requests on a node."""

    def __init__(self, node: Node, *, max_context: int | None = None) -> None:
        self.node = node
        self.max_context = max_context
        self._tokenizers: dict[str, Tokenizer] = {}

    def tokenizer(self, card: ModelCard) -> Tokenizer:
        """The model's tokenizer, looked up once (finding its files costs milliseconds per call)."""
        tokenizer = self._tokenizers.get(card.id)
        if tokenizer is None:
            tokenizer = self._tokenizers[card.id] = load_tokenizer(card)
        return tokenizer

    def context_length(self, card: ModelCard) -> int:
        limits = [c for c in (card.context_length, self.max_context) if c]
        return min(limits) if limits else 4096

    def prepare(self, req: TextRequest) -> PreparedRequest:
        try:
            tokenizer = self.tokenizer(req.model)
        except (TokenizerError, ModelFilesError, OSError):
            if not self.node.origin.whole_nodes(req.model):
                raise
            # Whole-request engines exchange text: the server tokenizes and checks the context.
            if req.messages is None and not req.prompt:
                raise ValueError("the prompt is empty") from None
            return PreparedRequest(req, None, [], req.max_tokens)
        prompt_param = "messages" if req.messages is not None else "prompt"
        if req.messages is not None:
            prompt_tokens = tokenizer.encode_chat(req.messages, tools=req.tools)
        else:
            prompt_tokens = tokenizer.encode(req.prompt or "")
        if not prompt_tokens:
            raise ValueError("the prompt is empty")
        ctx = self.context_length(req.model)
        room = ctx - len(prompt_tokens)
        if room <= 0:
            raise ContextLengthError(
                f"this model's maximum context length is {ctx} tokens, but the prompt has "
                f"{len(prompt_tokens)} tokens; shorten the {prompt_param}",
                param=prompt_param,
            )
        if req.max_tokens is not None and req.max_tokens > room:
            raise ContextLengthError(
                f"this model's maximum context length is {ctx} tokens; the prompt has "
                f"{len(prompt_tokens)} tokens and max_tokens asks for {req.max_tokens} more; "
                f"ask for at most {room}",
                param="max_tokens",
            )
        max_tokens = req.max_tokens if req.max_tokens is not None else room
        return PreparedRequest(req, tokenizer, prompt_tokens, max_tokens)

    async def stream(
        self, prepared: PreparedRequest, usage: Usage | None = None
    ) -> AsyncGenerator[TextChunk, None]:
        """Text chunks as tokens arrive; closing it early stops the generation everywhere.

        The origin picks the way: the layer-sharded ring (token ids), or the whole-request
        replica (text) with the shortest expected time.
        """
        usage = usage if usage is not None else Usage()
        route = self.node.origin.route(prepared.text_request.model, ring_ok=prepared.tokenizer is not None)
        if route != RING:
            chunks = self._stream_text(prepared, usage, route)
        else:
            chunks = self._stream_ring(prepared, usage)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _stream_ring(self, prepared: PreparedRequest, usage: Usage) -> AsyncGenerator[TextChunk, None]:
        """Token ids through the ring (the last stage samples), decoded here."""
        usage.prompt_tokens = len(prepared.prompt_tokens)
        req = prepared.text_request
        tokenizer = prepared.tokenizer
        assert tokenizer is not None and prepared.max_tokens is not None
        run = self.node.origin.balancer.run(RING)
        request = GenerationRequest(
            model=req.model,
            prompt_tokens=prepared.prompt_tokens,
            sampling=req.sampling,
            max_tokens=prepared.max_tokens,
            eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
            messages=req.messages,
            constraint=req.constraint,
        )
        decoder = tokenizer.stream_decoder()
        stops = StopMatcher(req.stop)
        pending: list[GeneratedToken] = []
        start = time.perf_counter()
        # Node.generate is an async generator; it is typed as an iterator.
        tokens = cast(AsyncGenerator[GeneratedToken, None], self.node.generate(request))
        try:
            async with contextlib.aclosing(tokens):
                async for tok in tokens:
                    # Let the step that computes the next token start before this one is decoded and
                    # sent: the work below then overlaps the engine instead of delaying it.
                    await asyncio.sleep(0)
                    if usage.first_token_s is None:
                        usage.first_token_s = time.perf_counter() - start
                        usage.cached_tokens = tok.cached_tokens
                        run.first_at = time.perf_counter()  # the ring is measured like a replica
                    usage.completion_tokens += 1
                    usage.elapsed_s = time.perf_counter() - start
                    pending.append(tok)
                    is_eos = tok.finish_reason == "stop" and tok.token in tokenizer.eos_token_ids
                    piece = "" if is_eos else decoder.push(tok.token)
                    if tok.finish_reason is not None and not is_eos:
                        piece += decoder.flush()
                    text, stopped = stops.feed(piece)
                    if stopped:
                        yield TextChunk(text, pending, "stop")
                        return
                    if tok.finish_reason is not None:
                        yield TextChunk(text + stops.flush(), pending, tok.finish_reason)
                        return
                    if text:
                        yield TextChunk(text, pending)
                        pending = []
        finally:
            run.tokens = usage.completion_tokens
            run.close(ok=True)

    async def _stream_text(
        self, prepared: PreparedRequest, usage: Usage, first: str
    ) -> AsyncGenerator[TextChunk, None]:
        """The request as text to a whole-request replica; its text back, cut at stop strings."""
        req = prepared.text_request
        request = TextGeneration(
            request_id=uuid.uuid4().hex,
            model=req.model,
            messages=req.messages,
            prompt=req.prompt,
            sampling=req.sampling,
            max_tokens=req.max_tokens,
            stop=tuple(req.stop),
            extra=dict(req.extra),
        )
        stops = StopMatcher(req.stop)
        received: list[str] = []
        counted: list[TextDelta] = []
        calls: list[ToolCall] = []
        start = time.perf_counter()
        deltas = self.node.origin.generate_text(request, first)
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    if delta.prompt_tokens is not None or delta.completion_tokens is not None:
                        counted.append(delta)
                    if delta.text or delta.tool_calls:
                        if usage.first_token_s is None:
                            usage.first_token_s = time.perf_counter() - start
                        received.append(delta.text)
                    calls.extend(delta.tool_calls)
                    received.extend(c.name + c.arguments for c in delta.tool_calls)  # usage estimate
                    usage.elapsed_s = time.perf_counter() - start
                    text, stopped = stops.feed(delta.text)
                    if stopped:
                        self._text_usage(prepared, usage, "".join(received), counted)
                        yield TextChunk(text, [], "stop")
                        return
                    if delta.finish_reason is not None:
                        # usage is final before the last chunk: the API counts it then
                        self._text_usage(prepared, usage, "".join(received), counted)
                        yield TextChunk(text + stops.flush(), [], delta.finish_reason, tuple(calls))
                        return
                    if text:
                        yield TextChunk(text, [])
        finally:
            self._text_usage(prepared, usage, "".join(received), counted)

    @staticmethod
    def _text_usage(prepared: PreparedRequest, usage: Usage, answer: str, counted: list[TextDelta]) -> None:
        """The server's counts when it gave them, else the tokenizer's, else ~4 characters a token."""
        req = prepared.text_request
        tokenizer = prepared.tokenizer
        prompt = next((d.prompt_tokens for d in reversed(counted) if d.prompt_tokens is not None), None)
        completion = next(
            (d.completion_tokens for d in reversed(counted) if d.completion_tokens is not None), None
        )
        if prompt is None:
            if prepared.prompt_tokens:
                prompt = len(prepared.prompt_tokens)
            else:
                chars = sum(len(str(m.get("content") or "")) for m in req.messages or ()) + len(
                    req.prompt or ""
                )
                prompt = _estimate_tokens(chars)
        if completion is None:
            completion = (
                len(tokenizer.encode(answer)) if tokenizer is not None else _estimate_tokens(len(answer))
            )
        usage.prompt_tokens = prompt
        usage.completion_tokens = completion


def _estimate_tokens(chars: int) -> int:
    """Tokens of a text no tokenizer here can count: about 4 characters each (OpenAI's rule of thumb)."""
    return max(1, (chars + 3) // 4) if chars else 0


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes one token stands for (what logprobs report; a token may hold part of a character)."""
    piece = tokenizer.hf.id_to_token(token)
    if piece is None:
        return b""
    if isinstance(tokenizer.hf.decoder, decoders.ByteLevel):
        table = _byte_level_alphabet()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return tokenizer.decode([token]).encode("utf-8")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted (character -> byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class StopMatcher:
    """Cuts text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:k]):
                    keep = max(keep, k)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
