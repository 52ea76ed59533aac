"""The upstream engine: whole requests forwarded to OpenAI-compatible servers, their answers streamed back.

Each `--upstream URL[=MODEL]` is one replica. At start the engine asks every upstream's
`GET /v1/models` what it serves and how long its context is; each model appears under its
exo card id when one matches (the card's id or an alias, case-insensitive, or MODEL), and
under the upstream's own id always. A request is one streamed `POST /v1/chat/completions`
(or `/v1/completions` for a plain prompt) carrying the sampling settings, `max_tokens`, `stop`
and every extra field the client sent (`tools`, `response_format`, ...) as they are; text is
passed on as it arrives, and the usage is the server's own. Tool calls the server streams in
fragments (`delta.tool_calls`: index, id, name, pieces of the arguments) are put together and
handed on whole, with the last delta (`finish_reason` "tool_calls").

Failures: a server that cannot be reached, answers 503, cuts its stream, or goes silent
mid-answer (`--upstream-idle-timeout`, counted from the answer's first byte: a request waiting
in the server's queue sends nothing and is bounded by `--upstream-first-byte-timeout`) is a
`ReplicaUnavailable` (core goes on with another replica, skipping the text already delivered);
a 4xx keeps its status and the server's message; a 5xx, or a body that is not the protocol, is
a 502 with what the server said.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import click
import structlog

from exo_core import (
    ConfigError,
    ModelCard,
    ReplicaUnavailable,
    TextDelta,
    TextEngine,
    TextGeneration,
    ToolCall,
    UpstreamError,
)

log = structlog.get_logger("exo.upstream")

KEY_ENV = "EXO_UPSTREAM_API_KEY"
CONTEXT_KEYS = ("max_model_len", "context_length", "context_window", "max_context_length", "n_ctx")
IDLE_TIMEOUT = 120.0  # seconds without a byte, once the answer has started
FIRST_BYTE_TIMEOUT = 900.0  # seconds until the answer starts (queueing on the server included)


@dataclass(frozen=True)
class Upstream:
    """One OpenAI-compatible server: its base URL (without /v1), the model asked for, its key."""

    url: str
    model: str | None = None
    api_key: str | None = None


def parse_upstreams(values: Any, env: Mapping[str, str] | None = None) -> list[Upstream]:
    """`--upstream URL[=MODEL]` values; the key of each from the environment (see `api_key_for`)."""
    env = os.environ if env is None else env
    items = [values] if isinstance(values, str) else list(values or ())
    out: list[Upstream] = []
    for item in items:
        url, sep, model = str(item).partition("=")
        url = url.strip()
        if not url or (sep and not model.strip()):
            raise ConfigError(f"--upstream wants URL or URL=MODEL, got {item!r}")
        if "://" not in url:
            url = f"http://{url}"
        url = re.sub(r"/v1/?$", "", url.rstrip("/"))
        out.append(Upstream(url, model.strip() or None, api_key_for(url, env)))
    return out


def api_key_for(url: str, env: Mapping[str, str]) -> str | None:
    """EXO_UPSTREAM_API_KEY_<HOST>_<PORT> (upper case, other characters as _), else EXO_UPSTREAM_API_KEY."""
    host = re.sub(r"^[a-z]+://", "", url).split("/")[0]
    own = KEY_ENV + "_" + re.sub(r"[^A-Z0-9]", "_", host.upper())
    return env.get(own) or env.get(KEY_ENV) or None


def context_of(entry: Mapping[str, Any]) -> int | None:
    """A model's context length from its /v1/models entry, in any of the servers' spellings."""
    for source in (entry, entry.get("meta") or {}):
        if not isinstance(source, Mapping):
            continue
        for key in (*CONTEXT_KEYS, "n_ctx_train"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _find(cards: Mapping[str, ModelCard], name: str) -> ModelCard | None:
    wanted = name.lower()
    for card in cards.values():
        if card.id.lower() == wanted or wanted in (a.lower() for a in card.aliases):
            return card
    return None


class UpstreamEngine(TextEngine):
    """Forwards whole requests to OpenAI-compatible servers (each one a replica)."""

    name = "upstream"
    source_kinds = ("upstream",)
    cli_options = (
        click.Option(
            ["--upstream"],
            multiple=True,
            metavar="URL[=MODEL]",
            help="upstream engine: an OpenAI-compatible server (repeatable); MODEL picks one of its "
            "models (default: all). Key from EXO_UPSTREAM_API_KEY[_HOST_PORT].",
        ),
        click.Option(
            ["--upstream-idle-timeout"],
            type=float,
            default=IDLE_TIMEOUT,
            show_default=True,
            metavar="SECONDS",
            help="upstream engine: an answer that has started and then sends nothing this long is "
            "taken as cut, and goes on on another replica.",
        ),
        click.Option(
            ["--upstream-first-byte-timeout"],
            type=float,
            default=FIRST_BYTE_TIMEOUT,
            show_default=True,
            metavar="SECONDS",
            help="upstream engine: the longest wait for an answer's first byte (a request queued "
            "on a busy server sends nothing until its turn); then it goes to another replica.",
        ),
    )

    @classmethod
    def default_priority(cls) -> int:
        return -1  # only when asked for: it needs --upstream

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.upstreams = parse_upstreams(self.options.get("upstream"))
        self.idle_timeout = _seconds(self.options, "upstream_idle_timeout", IDLE_TIMEOUT)
        self.first_byte_timeout = _seconds(self.options, "upstream_first_byte_timeout", FIRST_BYTE_TIMEOUT)
        self._by_url = {u.url: u for u in self.upstreams}
        # exo model id -> {replica url: the upstream's own model id}
        self.routes: dict[str, dict[str, str]] = {}
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No read timeout: an answer takes as long as it takes; connecting is bounded.
            timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=None)
            connector = aiohttp.TCPConnector(limit=0)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        return self._session

    def _headers(self, replica: str) -> dict[str, str]:
        key = self._by_url[replica].api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- models ----------------------------------------------------------------------------

    async def list_models(self, replica: str) -> list[dict[str, Any]]:
        """The upstream's `GET /v1/models` entries; `ReplicaUnavailable` when it does not answer."""
        try:
            async with self._http().get(
                replica + "/v1/models",
                headers=self._headers(replica),
                timeout=aiohttp.ClientTimeout(total=5.0),
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise ReplicaUnavailable(
                        f"upstream {replica}: GET /v1/models answered HTTP {resp.status}: {_message(raw)}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ReplicaUnavailable(
                f"cannot reach upstream {replica} ({exc or type(exc).__name__})"
            ) from exc
        try:
            data = json.loads(raw).get("data")
        except (ValueError, AttributeError):
            data = None
        if not isinstance(data, list):
            raise ReplicaUnavailable(f"upstream {replica}: GET /v1/models is not a model list: {raw[:120]!r}")
        return [e for e in data if isinstance(e, dict) and e.get("id")]

    async def discover_models(self, known: Mapping[str, ModelCard]) -> Sequence[ModelCard]:
        cards: dict[str, ModelCard] = {}
        for upstream in self.upstreams:
            try:
                entries = await self.list_models(upstream.url)
            except ReplicaUnavailable as exc:
                if upstream.model is None:
                    log.warning(
                        "upstream offers nothing now; it is skipped", upstream=upstream.url, error=str(exc)
                    )
                    continue
                log.warning("upstream not reachable; serving its model when it is", error=str(exc))
                entries = [{"id": upstream.model}]
            if upstream.model is not None:
                entries = self._pick(upstream, entries, known)
            for entry in entries:
                card = self._card_for(str(entry["id"]), upstream, context_of(entry), {**known, **cards})
                cards[card.id] = card
        return list(cards.values())

    def _pick(
        self, upstream: Upstream, entries: list[dict[str, Any]], known: Mapping[str, ModelCard]
    ) -> list[dict[str, Any]]:
        """The one entry `URL=MODEL` means: MODEL itself, the entry of MODEL's card, or the only one."""
        assert upstream.model is not None
        wanted = upstream.model.lower()
        card = _find(known, upstream.model)
        names = {wanted} | ({card.id.lower(), *(a.lower() for a in card.aliases)} if card else set())
        match = [e for e in entries if str(e["id"]).lower() in names]
        if not match and len(entries) == 1:
            match = entries
        if not match:
            offered = ", ".join(str(e["id"]) for e in entries) or "nothing"
            raise ConfigError(
                f"upstream {upstream.url} has no model {upstream.model!r} (it offers: {offered})"
            )
        entry = dict(match[0])
        entry["exo_id"] = card.id if card else upstream.model
        return [entry]

    def _card_for(
        self, upstream_id: str, upstream: Upstream, context: int | None, known: Mapping[str, ModelCard]
    ) -> ModelCard:
        card = _find(known, upstream_id)
        if upstream.model is not None and card is None:
            card = _find(known, upstream.model)
        if card is None:
            card = ModelCard(upstream.model or upstream_id, upstream.model or upstream_id, 1)
        aliases = card.aliases
        if upstream_id.lower() not in (card.id.lower(), *(a.lower() for a in aliases)):
            aliases = (*aliases, upstream_id)
        limits = [c for c in (card.context_length, context) if c]
        card = dataclasses.replace(
            card,
            sources={**card.sources, "upstream": upstream_id},
            aliases=aliases,
            context_length=min(limits) if limits else None,
        )
        self.routes.setdefault(card.id, {})[upstream.url] = upstream_id
        log.info("upstream model", model=card.id, upstream=upstream.url, upstream_id=upstream_id)
        return card

    def serves(self, card: ModelCard) -> bool:
        return card.id in self.routes

    # ---- replicas --------------------------------------------------------------------------

    def replicas(self, model: ModelCard | None = None) -> Sequence[str]:
        if model is None:
            return [u.url for u in self.upstreams]
        return list(self.routes.get(model.id, ()))

    async def check_replica(self, replica: str) -> None:
        await self.list_models(replica)

    # ---- requests --------------------------------------------------------------------------

    def request_body(self, request: TextGeneration, upstream_id: str) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of the upstream request."""
        body: dict[str, Any] = {
            "model": upstream_id,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = [_wire_message(m) for m in request.messages]
        else:
            path = "/v1/completions"
            body["prompt"] = request.prompt or ""
        s = request.sampling
        body["temperature"] = s.temperature
        body["top_p"] = s.top_p
        if s.top_k and s.top_k > 0:
            body["top_k"] = s.top_k
        if s.seed is not None:
            body["seed"] = s.seed
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.stop:
            body["stop"] = list(request.stop)
        body.update(request.extra)
        return path, body

    async def generate(self, request: TextGeneration, replica: str) -> AsyncGenerator[TextDelta]:
        upstream_id = self.routes.get(request.model.id, {}).get(replica, request.model.id)
        path, body = self.request_body(request, upstream_id)
        chat = request.messages is not None
        url = replica + path
        finish: str | None = None
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        calls = _CallAssembler(replica)
        done = False
        waited = f"upstream {replica} did not start its answer within {self.first_byte_timeout:g} s"
        try:
            try:
                async with asyncio.timeout(self.first_byte_timeout):
                    resp = await self._http().post(url, json=body, headers=self._headers(replica))
            except TimeoutError:
                raise ReplicaUnavailable(waited + " (--upstream-first-byte-timeout)") from None
            async with resp:
                if resp.status != 200:
                    raw = await resp.read()
                    message = f"upstream {replica}: {_message(raw)}"
                    if resp.status == 503:
                        raise ReplicaUnavailable(message + " (HTTP 503)")
                    if 400 <= resp.status < 500:
                        raise UpstreamError(message, resp.status)
                    raise UpstreamError(f"{message} (HTTP {resp.status})", 502)
                if "event-stream" not in resp.headers.get("Content-Type", ""):
                    raw = await resp.read()
                    raise UpstreamError(
                        f"upstream {replica} answered with {resp.content_type}, not an event stream: {raw[:120]!r}"
                    )
                events = _sse_data(resp, replica, self.first_byte_timeout, self.idle_timeout)
                async for data in events:
                    if data == "[DONE]":
                        done = True
                        break
                    obj = _json(data, replica)
                    usage = obj.get("usage")
                    if isinstance(usage, dict):
                        prompt_tokens = _int(usage.get("prompt_tokens"), prompt_tokens)
                        completion_tokens = _int(usage.get("completion_tokens"), completion_tokens)
                    for choice in obj.get("choices") or ():
                        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                            continue
                        if chat:
                            # streamed pieces are `delta`s; a server may send a whole `message`
                            part = choice.get("delta") or choice.get("message") or {}
                            if not isinstance(part, dict):
                                raise UpstreamError(
                                    f"upstream {replica} streamed a delta that is not an object"
                                )
                            text = part.get("content")
                            calls.feed(part.get("tool_calls"), whole="delta" not in choice)
                        else:
                            text = choice.get("text")
                        if text:
                            yield TextDelta(str(text))
                        if choice.get("finish_reason"):
                            finish = _finish(choice["finish_reason"])
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            raise ReplicaUnavailable(
                f"cannot reach upstream {replica} ({exc or type(exc).__name__})"
            ) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise ReplicaUnavailable(
                f"upstream {replica} cut the answer short ({exc or type(exc).__name__})"
            ) from exc
        if not done and finish is None:
            raise ReplicaUnavailable(
                f"upstream {replica} cut the answer short: the stream ended without [DONE]"
            )
        whole = calls.whole()
        if whole and finish in (None, "stop"):
            finish = "tool_calls"
        elif not whole and finish == "tool_calls":
            finish = "stop"
        yield TextDelta("", finish or "stop", prompt_tokens, completion_tokens, whole)


def _finish(reason: Any) -> str:
    """The server's finish reason as exo's: "length", "tool_calls", else "stop"."""
    if reason == "length":
        return "length"
    return "tool_calls" if reason in ("tool_calls", "function_call") else "stop"


class _CallAssembler:
    """Tool calls put together from a server's streamed fragments (OpenAI's `delta.tool_calls`:
    the first fragment of a call has its index, id and name, the rest pieces of its arguments)."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.calls: dict[int, dict[str, Any]] = {}
        self._last = -1

    def feed(self, fragments: Any, whole: bool = False) -> None:
        """One delta's `tool_calls` (`whole`: a `message`'s complete calls, listed in order)."""
        if fragments is None:
            return
        if not isinstance(fragments, list):
            raise self._bad(f"tool_calls is {type(fragments).__name__}, not a list")
        for fragment in fragments:
            if not isinstance(fragment, dict):
                raise self._bad(f"a tool call fragment is {fragment!r}, not an object")
            function = fragment.get("function") or {}
            if not isinstance(function, dict):
                raise self._bad(f"a tool call's function is {function!r}, not an object")
            index = fragment.get("index")
            if whole:
                index = len(self.calls)
            elif index is None:  # some servers leave it out: a new id starts a new call
                known = {c["id"] for c in self.calls.values()}
                fresh = fragment.get("id") and fragment["id"] not in known
                index = self._last + 1 if fresh or self._last < 0 else self._last
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise self._bad(f"a tool call fragment has index {index!r}")
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": []})
            self._last = index
            if isinstance(fragment.get("id"), str) and fragment["id"] and not call["id"]:
                call["id"] = fragment["id"]
            name = function.get("name")
            if isinstance(name, str) and name and name != call["name"]:
                call["name"] += name
            arguments = function.get("arguments")
            if isinstance(arguments, dict | list):
                arguments = json.dumps(arguments, ensure_ascii=False)
            if isinstance(arguments, str):
                call["arguments"].append(arguments)
            elif arguments is not None:
                raise self._bad(f"a tool call's arguments are {arguments!r}, not text")

    def whole(self) -> tuple[ToolCall, ...]:
        out = []
        for index in sorted(self.calls):
            call = self.calls[index]
            if not call["name"]:
                raise self._bad(f"tool call {index} never named its function")
            call_id = call["id"] or "call_" + uuid.uuid4().hex[:24]
            out.append(ToolCall(call_id, call["name"], "".join(call["arguments"])))
        return tuple(out)

    def _bad(self, what: str) -> UpstreamError:
        return UpstreamError(f"upstream {self.replica} streamed a malformed tool call: {what}")


def _wire_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message as OpenAI servers take it: core keeps a history call's arguments as an
    object (chat templates render them so); the protocol wants them as JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = dict(message)
    out["tool_calls"] = [
        {**call, "function": {**call["function"], "arguments": _arguments_text(call["function"])}}
        for call in calls
    ]
    return out


def _arguments_text(function: dict[str, Any]) -> str:
    arguments = function.get("arguments", "")
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _seconds(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    if value is None:
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"--{key.replace('_', '-')} wants a number of seconds above 0, got {value!r}")
    return seconds


async def _sse_data(
    resp: aiohttp.ClientResponse, replica: str, first_byte: float, idle: float
) -> AsyncGenerator[str]:
    """The `data:` payloads of an event stream (events may span reads; comments are skipped).

    Until the first byte arrives the wait is bounded by `first_byte` seconds (from now: a queued
    request), after it each silence by `idle`; either is a `ReplicaUnavailable`."""
    event: list[str] = []
    started = False
    while True:
        try:
            async with asyncio.timeout(idle if started else first_byte):
                raw = await resp.content.readline()
        except TimeoutError:
            if started:
                raise ReplicaUnavailable(
                    f"upstream {replica} sent nothing for {idle:g} s mid-answer (--upstream-idle-timeout)"
                ) from None
            raise ReplicaUnavailable(
                f"upstream {replica} did not start its answer within {first_byte:g} s "
                "(--upstream-first-byte-timeout)"
            ) from None
        if not raw:
            break
        started = True
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if event:
                yield "\n".join(event)
                event = []
            continue
        if line.startswith("data:"):
            event.append(line[5:].lstrip(" "))
        elif not line.startswith((":", "event:", "id:", "retry:")):
            raise UpstreamError(f"upstream sent a line that is not an event: {line[:120]!r}")
    if event:
        yield "\n".join(event)


def _json(data: str, replica: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise UpstreamError(
            f"upstream {replica} streamed something that is not JSON: {data[:120]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise UpstreamError(f"upstream {replica} streamed {data[:120]!r}, not a JSON object")
    if obj.get("error"):
        raise UpstreamError(f"upstream {replica}: {_message(obj)}")
    return obj


def _int(value: Any, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _message(raw: bytes | dict[str, Any]) -> str:
    """The server's error message: OpenAI's {"error": {"message"}}, {"error": "..."}, {"detail"}, or text."""
    body: Any = raw
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            return " ".join(text.split())[:300] or "(empty body)"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for value in (error, body.get("message"), body.get("detail")):
            if value:
                return str(value) if not isinstance(value, list | dict) else json.dumps(value)[:300]
        return json.dumps(body)[:300]
    return str(body)[:300]
