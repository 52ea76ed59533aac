"""The rkllm engine: whole requests sent to an RKLLAMA server, its streamed text turned into token ids.

The node asks for one token per step. On a request's first step the engine sends the whole
conversation to the server and returns at once; a background task reads the streamed text,
encodes each fragment in full with the model's tokenizer and appends the ids to the request's
token cache. Each step hands out the next cached id, waiting (without a short timeout) while
the server is still talking; end-of-sequence comes only when the server's stream has really
ended, and any failure on the way is raised as an `EngineError` with the server's message.

A replay (the origin re-sends prompt + generated tokens under a new attempt after a failure)
asks the server for the answer again and skips the text the client already has, so the
client's stream goes on where it stopped; a server whose second answer differs (sampling
without a seed) is an error rather than a garbled answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import structlog

from exo_core.engine import EngineError, InferenceEngine, StageInput, StageOutput, TextStageInput
from exo_core.models.cards import ModelCard
from exo_core.models.shard import Shard
from exo_core.models.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from exo_core.node.sampling import SamplingParams
from exo_core.node.topology import is_rk3588
from exo_rkllm.client import RKLLAMAClient, RKLLAMAError
from exo_rkllm.fragments import FragmentEncoder

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


@dataclass
class _Model:
    """A model this engine has checked: its RKLLAMA folder and tokenizer."""

    card: ModelCard
    folder: str
    tokenizer: Tokenizer
    eos: int


@dataclass
class _Stream:
    """One request's answer: the token cache the steps read from, filled as the server streams."""

    model: _Model
    encoder: FragmentEncoder
    # A replay: the ids an earlier attempt already delivered, and what has come back so far.
    skip: list[int] = field(default_factory=list)
    held_ids: list[int] = field(default_factory=list)
    held_text: str = ""
    ids: list[int] = field(default_factory=list)
    read: int = 0
    done: bool = False
    error: EngineError | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    queued: bool = True  # waiting for the server's previous answers to finish

    def push(self, fragment: str) -> None:
        if self.skip:
            self._skip_replayed(fragment)
            return
        self._add(self.encoder.encode(fragment))

    def _add(self, ids: list[int]) -> None:
        if ids:
            self.ids.extend(ids)
            self.wake.set()

    def _skip_replayed(self, fragment: str) -> None:
        """Drop the part of a replayed answer the client already has (it may end mid-character).

        The answer is encoded exactly as the first time, so normally the first ids are the
        delivered ones; if they were cut differently, the text decides.
        """
        tokenizer = self.model.tokenizer
        self.held_text += fragment
        self.held_ids += self.encoder.encode(fragment)
        n = len(self.skip)
        if len(self.held_ids) >= n and self.held_ids[:n] == self.skip:
            rest, self.skip = self.held_ids[n:], []
            self._add(rest)
            return
        delivered = tokenizer.decode(self.skip)
        if "\ufffd" in delivered:
            if len(self.held_ids) >= n:
                raise _diverged()
            return
        if self.held_text.startswith(delivered):
            # Same text, other token boundaries: go on from the delivered ids.
            rest_text = self.held_text[len(delivered) :]
            self.encoder = FragmentEncoder(tokenizer, context=self.skip)
            self.skip = []
            self._add(self.encoder.encode(rest_text))
        elif not delivered.startswith(self.held_text):
            raise _diverged()

    def finish(self, error: EngineError | None = None) -> None:
        if error is None and self.skip:
            error = _diverged()
        self.error = error
        self.done = True
        self.wake.set()

    async def next_token(self) -> int:
        while self.read >= len(self.ids):
            if self.error is not None:
                raise self.error
            if self.done:
                return self.model.eos
            self.wake.clear()
            await self.wake.wait()
        token = self.ids[self.read]
        self.read += 1
        return token


def _diverged() -> EngineError:
    return EngineError(
        "the RKLLAMA server answered a replayed request differently from the first time, so the "
        "answer cannot continue where it stopped (use temperature 0 or a seed for answers that "
        "survive a node failure)"
    )


class RKLLMEngine(InferenceEngine):
    """Bridge to an RKLLAMA server driving the RK3588 NPU (whole models, one request at a time)."""

    name = "rkllm"
    supports_sharding = False
    works_on_text = True
    concurrent_steps = True  # each step waits on its own request's stream
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
        self._models: dict[str, _Model] = {}
        self._checking: dict[str, asyncio.Future[_Model]] = {}
        self._streams: dict[str, _Stream] = {}

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

    async def load(self, shard: Shard, model: ModelCard) -> None:
        """Check the model once: its tokenizer is on this node and the server has its folder.

        The server loads the model itself when a request needs it (the fork holds one model at
        a time, so switching happens in the request queue, never under a running answer).
        """
        await self._model(model)

    async def _model(self, card: ModelCard) -> _Model:
        known = self._models.get(card.id)
        if known is not None:
            return known
        pending = self._checking.get(card.id)
        if pending is None:
            pending = asyncio.ensure_future(self._check(card))
            self._checking[card.id] = pending
            pending.add_done_callback(lambda _: self._checking.pop(card.id, None))
        model = await asyncio.shield(pending)
        self._models[card.id] = model
        return model

    async def _check(self, card: ModelCard) -> _Model:
        folder = self.folder_for(card)
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, card)
        except (TokenizerError, OSError) as exc:
            raise EngineError(
                f"the rkllm engine needs model {card.id!r}'s tokenizer on this node: {exc}"
            ) from exc
        if not tokenizer.eos_token_ids:
            raise EngineError(f"model {card.id!r}: its tokenizer names no end-of-sequence token")
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
        return _Model(card, folder, tokenizer, min(tokenizer.eos_token_ids))

    # ---- steps -----------------------------------------------------------------------------

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        # Requests wait on their own streams: a queued one must not hold up a running one.
        return list(await asyncio.gather(*(self._step(shard, item) for item in items)))

    async def _step(self, shard: Shard, item: StageInput) -> StageOutput:
        stream = self._streams.get(item.request_id)
        if stream is None:
            if not isinstance(item, TextStageInput):
                raise EngineError("rkllm engine: a request's first step must carry the whole request")
            stream = await self._start(shard, item)
        return StageOutput(token=await stream.next_token())

    def cached_requests(self) -> int:
        return len(self._streams)

    @property
    def loaded_shards(self) -> tuple[Shard, ...]:
        return tuple(Shard.whole(m.card.id, m.card.n_layers) for m in self._models.values())

    async def _start(self, shard: Shard, item: TextStageInput) -> _Stream:
        model = self._models.get(shard.model_id)
        if model is None:
            raise EngineError(f"rkllm engine: model {shard.model_id!r} was not loaded before its first step")
        tokens = [] if item.tokens is None else [int(t) for t in item.tokens]
        replayed = max(0, min(item.replayed, len(tokens)))
        prompt, done_ids = tokens[: len(tokens) - replayed], tokens[len(tokens) - replayed :]
        messages = item.messages
        if messages is None:
            # A plain completion: RKLLAMA only chats, so the prompt text becomes one user turn.
            messages = [{"role": "user", "content": model.tokenizer.decode(prompt, skip_special=True)}]
        # A replay encodes its answer from the start, as the first attempt did, and skips the
        # ids the client already has.
        stream = _Stream(model, FragmentEncoder(model.tokenizer), skip=done_ids)
        self._streams[item.request_id] = stream
        options = sampling_options(item.sampling, item.max_tokens)
        stream.task = asyncio.create_task(
            self._produce(stream, model, messages, options), name=f"rkllm-{item.request_id}"
        )
        return stream

    async def _produce(
        self, stream: _Stream, model: _Model, messages: list[dict[str, Any]], options: dict[str, Any]
    ) -> None:
        def on_turn() -> None:
            stream.queued = False

        fragments = self.client.generate(model.folder, messages, options, on_turn)
        try:
            async for fragment in fragments:
                stream.push(fragment)
            stream.finish()
        except EngineError as exc:
            stream.finish(exc)
        except Exception as exc:  # a bug here must still reach the user as an error, not an EOS
            log.exception("rkllm stream failed", server=self.server_url)
            stream.finish(RKLLAMAError(f"rkllm bridge failed reading {self.server_url}: {exc!r}"))
        finally:
            await fragments.aclose()

    def queued(self, request_id: str) -> bool:
        """True while the request waits for the server to finish the answers before it."""
        stream = self._streams.get(request_id)
        return stream is not None and stream.queued and not stream.done

    async def release(self, request_id: str) -> None:
        """Cancel the request's HTTP stream (freeing the server for the next) and drop its cache."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and stream.task is not None and not stream.task.done():
            stream.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream.task

    async def close(self) -> None:
        for request_id in list(self._streams):
            await self.release(request_id)
        await self.client.close()

    @property
    def active_streams(self) -> int:
        return len(self._streams)
