"""The rkllm engine: whole requests sent to an RKLLAMA server, its streamed text passed on as text.

A `TextEngine`: the server tokenizes (RKLLAMA reads the model's Hugging Face tokenizer on the
board), so this node needs no tokenizer and no model files. Each request sends the whole
conversation (RKLLAMA keeps no state between calls) and yields the server's fragments as they
arrive, then its token counts. Core balances requests over boards, health-checks them, and
continues an answer cut mid-stream on another board, skipping the text already delivered
(`exo_core/node/replicas.py`). Every failure is an `EngineError` with the server's message;
a server that cannot be reached or cuts an answer short is a `ReplicaUnavailable`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import click
import structlog

from exo_core import EngineError, ModelCard, SamplingParams, TextDelta, TextEngine, TextGeneration, is_rk3588
from exo_rkllm.client import Counts, RKLLAMAClient, RKLLAMAError

log = structlog.get_logger("exo.rkllm")

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8080


def server_url(option: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The server's base URL: --rkllm-server, else RKLLM_SERVER_HOST / RKLLM_SERVER_PORT, else localhost:8080."""
    env = os.environ if env is None else env
    if option:
        url = option.strip()
        return (url if "://" in url else f"http://{url}").rstrip("/")
    host = env.get("RKLLM_SERVER_HOST") or DEFAULT_HOST
    port = env.get("RKLLM_SERVER_PORT") or str(DEFAULT_PORT)
    return f"http://{host}:{port}"


def folder_overrides(value: Any) -> dict[str, str]:
    """`--rkllm-model-dir MODEL=FOLDER` values (a list of strings, one string, or a mapping)."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        return {str(k).lower(): str(v) for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    out: dict[str, str] = {}
    for item in items:
        for part in str(item).split(","):
            model, sep, folder = part.partition("=")
            if not sep or not model.strip() or not folder.strip():
                raise EngineError(f"--rkllm-model-dir wants MODEL=FOLDER, got {part!r}")
            out[model.strip().lower()] = folder.strip()
    return out


def sampling_options(sampling: SamplingParams, max_tokens: int | None) -> dict[str, Any]:
    """Upstream's `options` for the request's sampling (the fork takes none: its Modelfile rules)."""
    options: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    if sampling.top_k:
        options["top_k"] = sampling.top_k
    if sampling.seed is not None:
        options["seed"] = sampling.seed
    if sampling.presence_penalty:
        options["presence_penalty"] = sampling.presence_penalty
    if sampling.frequency_penalty:
        options["frequency_penalty"] = sampling.frequency_penalty
    if max_tokens:
        options["num_predict"] = max_tokens
    return options


class RKLLMEngine(TextEngine):
    """Bridge to an RKLLAMA server driving the RK3588 NPU (whole models, one request at a time)."""

    name = "rkllm"
    source_kinds = ("rkllm",)
    cli_options = (
        click.Option(
            ["--rkllm-server"],
            default=None,
            metavar="URL",
            help="rkllm engine: the RKLLAMA server (default: RKLLM_SERVER_HOST:RKLLM_SERVER_PORT, "
            "else localhost:8080).",
        ),
        click.Option(
            ["--rkllm-model-dir"],
            multiple=True,
            metavar="MODEL=FOLDER",
            help="rkllm engine: serve MODEL from this RKLLAMA model folder (repeatable).",
        ),
    )

    @classmethod
    def default_priority(cls) -> int:
        return 100 if is_rk3588() else -1  # the default on an RK3588, never elsewhere

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.server_url = server_url(self.options.get("rkllm_server"))
        self.overrides = folder_overrides(self.options.get("rkllm_model_dir"))
        self.client = RKLLAMAClient(self.server_url)
        self._checked: dict[str, asyncio.Future[str]] = {}  # model id -> its folder, checked
        self._active = 0

    # ---- models ----------------------------------------------------------------------------

    def folder_for(self, card: ModelCard) -> str:
        for key in (card.id, *card.aliases):
            if key.lower() in self.overrides:
                return self.overrides[key.lower()]
        folder = card.sources.get("rkllm")
        if not folder:
            raise EngineError(
                f"model {card.id!r} names no RKLLAMA model folder; map it with --rkllm-model-dir {card.id}=FOLDER"
            )
        return folder

    async def _folder(self, card: ModelCard) -> str:
        """The model's folder, checked against the server's list once (again after a failure).

        The server loads the model itself when a request needs it (the fork holds one model at
        a time, so switching happens in the request queue, never under a running answer).
        """
        pending = self._checked.get(card.id)
        if pending is None or (pending.done() and pending.exception() is not None):
            pending = self._checked[card.id] = asyncio.ensure_future(self._check(card))
        return await asyncio.shield(pending)

    async def _check(self, card: ModelCard) -> str:
        folder = self.folder_for(card)
        offered = await self.client.models()
        if offered.names and folder not in offered.names:
            raise EngineError(
                f"the RKLLAMA server at {self.server_url} has no model folder {folder!r} for "
                f"{card.id!r} (it has: {', '.join(offered.names)}). Put the converted .rkllm model "
                f"and its Modelfile in ~/RKLLAMA/models/{folder}/, or map the model to a folder the "
                f"server has with --rkllm-model-dir {card.id}=FOLDER"
            )
        if not offered.names:
            log.warning("RKLLAMA server lists no models", server=self.server_url)
        log.info("rkllm model ready", model=card.id, folder=folder, dialect=offered.dialect)
        return folder

    # ---- requests --------------------------------------------------------------------------

    def replicas(self, model: ModelCard | None = None) -> Sequence[str]:
        return (self.server_url,)

    async def check_replica(self, replica: str) -> None:
        await self.client.ping()

    async def generate(self, request: TextGeneration, replica: str) -> AsyncGenerator[TextDelta]:
        """The server's answer as it streams. One generation at a time per server: requests
        wait in the client's queue, in order (the fork's concurrent streams would interleave)."""
        folder = await self._folder(request.model)
        messages = request.messages
        if messages is None:
            # A plain completion: RKLLAMA only chats, so the prompt becomes one user turn.
            messages = [{"role": "user", "content": request.prompt or ""}]
        options = sampling_options(request.sampling, request.max_tokens)
        limit = request.max_tokens
        counts = Counts()
        pieces = 0
        self._active += 1
        fragments = self.client.generate(folder, messages, options)
        try:
            async for item in fragments:
                if isinstance(item, Counts):
                    counts = item
                    produced = counts.completion_tokens if counts.completion_tokens is not None else pieces
                    if limit is not None and produced >= limit:
                        # The fork takes no token budget: cut it here (a fragment is about a token).
                        yield TextDelta("", "length", counts.prompt_tokens, produced)
                        return
                    continue
                pieces += 1
                yield TextDelta(item)
            done = counts.completion_tokens if counts.completion_tokens is not None else pieces
            finish = "length" if limit is not None and done >= limit else "stop"
            yield TextDelta("", finish, counts.prompt_tokens, counts.completion_tokens)
        except EngineError:
            raise
        except Exception as exc:  # a bug here must still reach the user as an error, not an end
            log.exception("rkllm stream failed", server=self.server_url)
            raise RKLLAMAError(f"rkllm bridge failed reading {self.server_url}: {exc!r}") from exc
        finally:
            self._active -= 1
            await fragments.aclose()

    @property
    def active_streams(self) -> int:
        """Answers streaming (or waiting their turn) now."""
        return self._active

    async def close(self) -> None:
        await self.client.close()
