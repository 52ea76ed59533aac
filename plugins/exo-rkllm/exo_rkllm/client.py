"""The HTTP client for one RKLLAMA server: dialect probe, model folders, one streamed generation at a time.

Both dialects of RKLLAMA_API.md are spoken; which one is found by `GET /api/version` (the
fork answers 404 there). Every failure — server down, HTTP 4xx/5xx, Flask's HTML 500 page,
the 300-second abort, a stream cut mid-answer, a load failure, bytes that are not the
documented JSON — is raised as `RKLLAMAError` (an `EngineError`) with the server's own
message, never turned into an end of answer.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from exo_core import EngineError, ReplicaUnavailable

FORK = "fork"
UPSTREAM = "upstream"

# A control call (model list, dialect probe, current model, unload) that has not answered in
# this long never will: without a bound one hung call holds the lock every later request waits
# on. Loading a model onto the NPU takes longer.
CONTROL_TIMEOUT = 30.0
LOAD_TIMEOUT = 300.0

_ABORT = re.compile(r"Aborted inference by Timeout \(\d+ seconds\)\. Try again\.")
_TAG = re.compile(r"<[^>]+>")


class RKLLAMAError(EngineError):
    """The RKLLAMA server failed or could not be reached; the message is the server's."""


class RKLLAMAUnavailable(RKLLAMAError, ReplicaUnavailable):
    """The server cannot be reached, or cut an answer short: another board may go on with it."""


@dataclass(frozen=True)
class Counts:
    """The server's token counts for an answer (the fork repeats them in every chunk; upstream
    sends them in its final chunk)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class ServerModels:
    """What the server says it has: model folder names and, for the fork, the loaded one."""

    dialect: str
    names: tuple[str, ...]


class RKLLAMAClient:
    """Talks to one server. `generate` holds a lock for the whole answer: one generation at a time.

    The fork shares one runtime handle between concurrent streams (they interleave), and the
    upstream server aborts requests that wait longer than 300 s in its queue, so queueing here,
    in order, is right for both.
    """

    def __init__(
        self, base_url: str, *, connect_timeout: float = 10.0, control_timeout: float = CONTROL_TIMEOUT
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._connect_timeout = connect_timeout
        self._control_timeout = control_timeout
        self._session: aiohttp.ClientSession | None = None
        self._dialect: str | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No read timeout: a step waits as long as the server takes (the origin has its own
            # step timeout); only connecting is bounded.
            timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout, sock_read=None)
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    # ---- plain requests --------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> tuple[int, Any]:
        """(status, parsed JSON or text) within `timeout` (default: the control timeout);
        connection failures and servers that do not answer in time become RKLLAMAUnavailable."""
        seconds = timeout or self._control_timeout
        try:
            async with asyncio.timeout(seconds):
                async with self._http().request(method, self.base_url + path, json=body) as resp:
                    raw = await resp.read()
                    return resp.status, _parse_body(raw, resp.content_type)
        except aiohttp.ClientConnectionError as exc:
            self._dialect = None  # it may come back as the other dialect
            raise self._unreachable(exc) from exc
        except TimeoutError:
            self._dialect = None
            raise RKLLAMAUnavailable(
                f"the RKLLAMA server at {self.base_url} did not answer {method} {path} within {seconds:.0f} s"
            ) from None

    def _unreachable(self, exc: BaseException) -> RKLLAMAError:
        return RKLLAMAUnavailable(
            f"cannot reach the RKLLAMA server at {self.base_url} ({exc or type(exc).__name__}); "
            "start it, or point exo at it with --rkllm-server URL (or RKLLM_SERVER_HOST / RKLLM_SERVER_PORT)"
        )

    def _failure(self, what: str, status: int, body: Any) -> RKLLAMAError:
        return RKLLAMAError(
            f"RKLLAMA server {self.base_url}: {what} failed (HTTP {status}): {_message(body)}"
        )

    async def ping(self) -> None:
        """The health check: `GET /` answers (any status); raises `RKLLAMAUnavailable` when not."""
        await self._request("GET", "/")

    async def dialect(self) -> str:
        """'fork' or 'upstream', probed once (again after a connection failure)."""
        if self._dialect is None:
            status, body = await self._request("GET", "/api/version")
            if status == 200 and isinstance(body, dict) and "version" in body:
                self._dialect = UPSTREAM
            elif status == 404:
                self._dialect = FORK
            else:
                raise self._failure("GET /api/version (dialect probe)", status, body)
        return self._dialect

    async def models(self) -> ServerModels:
        """The model folder names the server offers."""
        dialect = await self.dialect()
        if dialect == FORK:
            status, body = await self._request("GET", "/models")
            if status != 200 or not isinstance(body, dict):
                raise self._failure("listing models (GET /models; is ~/RKLLAMA/models there?)", status, body)
            return ServerModels(FORK, tuple(str(n) for n in body.get("models", [])))
        status, body = await self._request("GET", "/api/tags")
        if status != 200 or not isinstance(body, dict):
            raise self._failure("listing models (GET /api/tags)", status, body)
        names: list[str] = []
        for entry in body.get("models", []):
            if isinstance(entry, dict):
                names.extend(str(entry[k]) for k in ("name", "model") if entry.get(k))
        return ServerModels(UPSTREAM, tuple(dict.fromkeys(names)))

    async def _fork_switch_to(self, folder: str) -> None:
        """Make `folder` the fork's loaded model (it holds one at a time: unload, then load)."""
        status, body = await self._request("GET", "/current_model")
        current = body.get("model_name") if status == 200 and isinstance(body, dict) else None
        if current == folder:
            return
        if status not in (200, 404):
            raise self._failure("GET /current_model", status, body)
        if current is not None:
            status, body = await self._request("POST", "/unload_model")
            if status != 200 and "no model" not in _message(body).lower():
                raise self._failure(f"unloading {current!r}", status, body)
        status, body = await self._request("POST", "/load_model", {"model_name": folder}, LOAD_TIMEOUT)
        if status != 200:
            raise self._failure(f"loading model {folder!r}", status, body)

    # ---- the generation --------------------------------------------------------------------

    async def generate(
        self,
        folder: str,
        messages: list[dict[str, Any]],
        options: dict[str, Any] | None = None,
        on_turn: Callable[[], None] | None = None,
    ) -> AsyncGenerator[str | Counts]:
        """The answer's text fragments as the server streams them, each followed by the server's
        counts when it sent any; waits its turn first.

        `on_turn` is called when the wait is over. Closing the iterator (or cancelling its
        consumer) closes the HTTP stream, which ends the generation on the server and lets the
        next request in.
        """
        async with self._lock:
            if on_turn is not None:
                on_turn()
            dialect = await self.dialect()
            if dialect == FORK:
                await self._fork_switch_to(folder)
                body: dict[str, Any] = {"messages": fork_messages(messages), "stream": True}
                path, parse = "/generate", _fork_fragments
            else:
                body = {"model": folder, "messages": upstream_messages(messages), "stream": True}
                if options:
                    body["options"] = options
                path, parse = "/api/chat", _upstream_fragments
            started = False
            try:
                async with self._http().post(self.base_url + path, json=body) as resp:
                    if resp.status != 200:
                        raw = await resp.read()
                        what = f"generating with {folder!r} (POST {path})"
                        raise self._failure(what, resp.status, _parse_body(raw, resp.content_type))
                    async for fragment in parse(resp, self.base_url):
                        started = True
                        yield fragment
            except aiohttp.ClientConnectorError as exc:
                self._dialect = None
                raise self._unreachable(exc) from exc
            except aiohttp.ServerDisconnectedError as exc:
                if not started:  # a kept-alive connection to a server that has gone away
                    self._dialect = None
                    raise self._unreachable(exc) from exc
                raise RKLLAMAUnavailable(
                    f"RKLLAMA server {self.base_url} cut the answer short: the stream broke off "
                    f"mid-answer ({exc or type(exc).__name__})"
                ) from exc
            except aiohttp.ClientPayloadError as exc:
                raise RKLLAMAUnavailable(
                    f"RKLLAMA server {self.base_url} cut the answer short: the stream broke off "
                    f"mid-answer ({exc or type(exc).__name__})"
                ) from exc
            except aiohttp.ClientError as exc:
                raise RKLLAMAError(f"RKLLAMA server {self.base_url}: {type(exc).__name__}: {exc}") from exc


# ---- messages for each dialect -----------------------------------------------------------------


def _text(content: Any) -> str:
    """Message content as text (OpenAI content parts are joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return "" if content is None else str(content)


def upstream_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation as upstream takes it: system turns stay (they become its system prompt)."""
    out = []
    for m in messages:
        role = str(m.get("role", "user"))
        role = "system" if role == "developer" else role if role in ("system", "assistant") else "user"
        out.append({"role": role, "content": _text(m.get("content"))})
    return out


def fork_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation as the fork's template accepts it: user/assistant alternating, user first.

    The fork adds its own system turn, and a second one is an HTML 500, so system prompts are
    folded into the first user turn; consecutive turns of one role are merged (blank line
    between); a conversation that opens with the assistant gets an empty user turn first.
    """
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for m in upstream_messages(messages):
        if m["role"] == "system":
            system.append(m["content"])
        elif turns and turns[-1]["role"] == m["role"]:
            turns[-1]["content"] += "\n\n" + m["content"]
        else:
            turns.append(dict(m))
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": ""})
    if system:
        prefix = "\n\n".join(s for s in system if s)
        first = turns[0]["content"]
        turns[0]["content"] = f"{prefix}\n\n{first}" if first and prefix else prefix or first
    return turns


# ---- stream parsing ------------------------------------------------------------------------------


async def _records(resp: aiohttp.ClientResponse, separator: bytes) -> AsyncIterator[tuple[str, bool]]:
    """(record text, whether a separator ended it): bytes are buffered until a separator, so
    objects and multi-byte characters split across network reads come out whole."""
    buffer = b""
    async for data in resp.content.iter_any():
        buffer += data
        *records, buffer = buffer.split(separator)
        for record in records:
            if record.strip():
                yield record.decode("utf-8", "replace"), True
    if buffer.strip():
        yield buffer.decode("utf-8", "replace"), False


def _load(record: str, ended: bool, base_url: str) -> dict[str, Any]:
    try:
        obj = json.loads(record)
    except ValueError:
        if not ended:
            raise RKLLAMAUnavailable(
                f"RKLLAMA server {base_url} cut the answer short: the stream ended inside a JSON "
                f"object ({record[:80]!r})"
            ) from None
        raise RKLLAMAError(
            f"RKLLAMA server {base_url} streamed something that is not JSON: {record[:120]!r}"
        ) from None
    if not isinstance(obj, dict):
        raise RKLLAMAError(f"RKLLAMA server {base_url} streamed {record[:120]!r}, not a JSON object")
    if "error" in obj or obj.get("status") == "error":
        raise RKLLAMAError(f"RKLLAMA server {base_url}: {_message(obj)}")
    return obj


async def _fork_fragments(resp: aiohttp.ClientResponse, base_url: str) -> AsyncIterator[str | Counts]:
    """The fork's stream: JSON objects separated by blank lines and no final chunk — the end of
    the body is the end of the answer (a cut connection shows as a broken chunked body)."""
    async for record, ended in _records(resp, b"\n\n"):
        obj = _load(record, ended, base_url)
        try:
            content = obj["choices"][0]["content"]
        except (KeyError, IndexError, TypeError):
            raise RKLLAMAError(
                f"RKLLAMA server {base_url} streamed an unexpected object: {record[:120]!r}"
            ) from None
        if content:
            _check_abort(content, base_url)
            yield str(content)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            yield Counts(_int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _upstream_fragments(resp: aiohttp.ClientResponse, base_url: str) -> AsyncIterator[str | Counts]:
    """Upstream's NDJSON: fragments, then a `done` chunk; without the done chunk the stream was cut."""
    async for record, ended in _records(resp, b"\n"):
        obj = _load(record, ended, base_url)
        content = (obj.get("message") or {}).get("content") or ""
        if content:
            _check_abort(content, base_url)
            yield str(content)
        if obj.get("done"):
            if not obj.get("prompt_eval_count") and not obj.get("eval_count"):
                raise RKLLAMAError(
                    f"RKLLAMA server {base_url} aborted the generation: its runtime did not answer in "
                    "time (the final chunk has zero counts); try again"
                )
            yield Counts(_int(obj.get("prompt_eval_count")), _int(obj.get("eval_count")))
            return
    raise RKLLAMAUnavailable(
        f"RKLLAMA server {base_url} cut the answer short: the stream ended without its final 'done' chunk"
    )


def _check_abort(content: str, base_url: str) -> None:
    match = _ABORT.search(content)
    if match:
        raise RKLLAMAError(f"RKLLAMA server {base_url}: {match.group(0)}")


# ---- error bodies --------------------------------------------------------------------------------


def _parse_body(raw: bytes, content_type: str) -> Any:
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _message(body: Any) -> str:
    """The server's error message from `{"error"}`, `{"message"}`, `{"detail"}` (the FastAPI
    releases after 0.0.74), Flask's HTML page, or raw text."""
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if body.get(key):
                return str(body[key])
        return json.dumps(body, ensure_ascii=False)[:300]
    text = str(body or "")
    if "<" in text and ">" in text:
        title = re.search(r"<title>(.*?)</title>", text, re.S | re.I)
        paragraphs = re.findall(r"<p>(.*?)</p>", text, re.S | re.I)
        parts = [title.group(1)] if title else []
        parts += paragraphs
        text = " — ".join(_TAG.sub("", p) for p in parts) if parts else _TAG.sub(" ", text)
        text = html.unescape(text)
    return " ".join(text.split())[:300] or "(empty body)"
