"""What the API's handlers share: the runtime they serve, the app's metrics, and the one map from
exceptions to OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from exo_core import __version__
from exo_core.api import protocol
from exo_core.api.metrics import ApiMetrics
from exo_core.api.protocol import APIError
from exo_core.engine import TextEngine
from exo_core.models.cards import ModelCard, UnknownModelError, find_card
from exo_core.models.tokenizer import TokenizerError
from exo_core.node.generate import ContextLengthError, Generator
from exo_core.node.messages import GenerationError
from exo_core.node.node import Node
from exo_core.node.origin import holds_layers_of
from exo_core.node.partitioning import NoPlanError
from exo_core.runtime import Runtime

log = structlog.get_logger("exo.api")


@dataclass
class ApiState:
    """What the handlers share: the runtime they serve and the app's metrics."""

    runtime: Runtime
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    created: int = field(default_factory=protocol.now)
    fingerprint: str = f"fp_exo_{__version__}"
    log: Any = log
    warm_models: set[str] = field(default_factory=set)  # tokenizer loaded: prepare needs no thread
    _resolving: dict[str, asyncio.Lock] = field(default_factory=dict)  # hub id -> its one lookup

    def is_warm(self, card: ModelCard) -> bool:
        return card.id in self.warm_models

    async def warm_up(self) -> None:
        """Load the default model's tokenizer ahead of the first request (it reads the model file)."""
        card = self.runtime.default_model
        try:
            await asyncio.to_thread(self.generator.tokenizer, card)
        except Exception as exc:  # the first request will say what is wrong
            log.info("tokenizer not loaded ahead", model=card.id, error=str(exc))
            return
        self.warm_models.add(card.id)

    @property
    def node(self) -> Node:
        assert self.runtime.node is not None, "the runtime is not started"
        return self.runtime.node

    @property
    def generator(self) -> Generator:
        assert self.runtime.generator is not None, "the runtime is not started"
        return self.runtime.generator

    def find_model(self, model_id: str) -> ModelCard:
        try:
            return find_card(self.node.models, model_id)
        except UnknownModelError as exc:
            served = ", ".join(sorted(self.servers_by_model())) or "none"
            raise model_not_found(
                f"The model {model_id!r} does not exist; models this cluster serves: {served}"
            ) from exc

    async def resolve_model(self, model_id: str) -> ModelCard:
        """`find_model`, and for a hub id (hf.co/ORG/REPO[:FILE|:QUANT]) this node has no card
        for, the card from the model's own metadata (as `exo run hf.co/...` makes it at start):
        under the id a peer serves it as when one does (so the plan can use that peer), else
        as asked. The card is registered, and this node serves the model from then on when its
        engine can. A repo that is not there, or not a model exo runs, is a 404 and changes
        nothing."""
        from exo_core.models.hub_cards import is_hub_id

        try:
            return self.find_model(model_id)
        except APIError:
            if not is_hub_id(model_id):
                raise
        lock = self._resolving.setdefault(model_id.lower(), asyncio.Lock())
        try:
            async with lock:
                try:
                    return find_card(self.node.models, model_id)  # a request before this one found it
                except UnknownModelError:
                    return await self._card_from_hub(model_id)
        finally:
            if not lock.locked():
                self._resolving.pop(model_id.lower(), None)

    async def _card_from_hub(self, model_id: str) -> ModelCard:
        from exo_core.models.files import ModelFilesError
        from exo_core.models.hub_cards import card_from_hub

        node = self.node
        known = [*node.models, *(m for n in node.cluster() for m in n.models)]
        served_as = _served_hub_id(model_id, known)
        card = node.models.get(served_as) if served_as else None  # here under another spelling
        if card is None:
            try:
                card = await asyncio.to_thread(card_from_hub, served_as or model_id)
            except ModelFilesError as exc:
                raise model_not_found(f"The model {model_id!r} cannot be served: {exc}") from exc
        if card.id.lower() != model_id.lower():
            card = dataclasses.replace(card, aliases=(*card.aliases, model_id))
        node.models[card.id] = card  # the stage reads the same cards
        served = node.info().models  # none listed: the node takes any model already
        if served and not isinstance(node.engine, TextEngine) and self.runtime.engine_cls.can_serve(card):
            node.set_served_models(sorted({*served, card.id}))
        log.info("hub model resolved", model=card.id, layers=card.n_layers, sources=dict(card.sources))
        return card

    def check_servable(self, card: ModelCard) -> None:
        try:
            self.node.make_plan(card)
        except NoPlanError as exc:
            raise _no_node(str(exc)) from exc

    def servers_by_model(self) -> dict[str, list[str]]:
        """Model id -> ids of the nodes that can serve it now, as plans pick them (a node listing
        no models serves any; one taking hub models serves the hub ids this node has cards for)."""
        out: dict[str, list[str]] = {}
        cards = list(self.node.models.values())
        for info in self.node.cluster():
            for card in cards:
                if holds_layers_of(info, card):
                    out.setdefault(card.id, []).append(info.node_id)
        return out

    def api_error(self, exc: BaseException, endpoint: str) -> APIError:
        """Map, count and log one failure."""
        error = to_api_error(exc)
        self.metrics.errors.labels(endpoint, error.type).inc()
        if error.status >= 500 and not isinstance(exc, APIError | GenerationError | TokenizerError):
            log.error("request failed", endpoint=endpoint, exc_info=exc)
        else:
            log.info("request refused", endpoint=endpoint, status=error.status, error=error.message)
        return error


def _served_hub_id(model_id: str, served: Iterable[str]) -> str | None:
    """The id under which some node serves the same hub model (hf.co/ vs huggingface.co/,
    letter case), so that a card made here plans onto that node."""
    from exo_core.models.files import ModelFilesError
    from exo_core.models.hub_cards import is_hub_id, parse_hub_id

    def key(hub_id: str) -> tuple[str, str] | None:
        try:
            repo, selector = parse_hub_id(hub_id)
        except ModelFilesError:
            return None
        return repo.lower(), (selector or "").lower()

    wanted = key(model_id)
    for other in served:
        if is_hub_id(other) and key(other) == wanted:
            return other
    return None


def model_not_found(message: str) -> APIError:
    """The 404 for a `model` field that names nothing this cluster can serve."""
    return APIError(404, message, type="not_found_error", param="model", code="model_not_found")


def _no_node(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="no_node_available")


def to_api_error(exc: BaseException) -> APIError:
    """The one place exceptions become OpenAI-shaped errors with an HTTP status."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return APIError(
            413,
            f"The request body is larger than the limit of {protocol.MAX_BODY_BYTES} bytes",
            code="request_too_large",
        )
    if isinstance(exc, web.HTTPException):
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return APIError(exc.status, exc.text or exc.reason, type=kind)
    if isinstance(exc, ContextLengthError):
        return protocol.invalid(str(exc), exc.param, "context_length_exceeded")
    if isinstance(exc, NoPlanError) or (
        isinstance(exc, GenerationError) and isinstance(exc.__cause__, NoPlanError)
    ):
        return _no_node(str(exc))
    if isinstance(exc, TokenizerError):
        return APIError(503, str(exc), type="server_error", code="model_not_available")
    if isinstance(exc, GenerationError):
        if 400 <= exc.status < 500:  # a whole-request server refused the request: its 4xx stays
            return APIError(exc.status, str(exc), code=exc.code)
        return APIError(exc.status, str(exc), type="server_error", code=exc.code or "generation_failed")
    return APIError(500, f"internal error ({type(exc).__name__}); see the node's log", type="server_error")


STATE = web.AppKey("exo_api_state", ApiState)


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > protocol.MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=protocol.MAX_BODY_BYTES, actual_size=request.content_length
        )
    raw = await request.read()
    if not raw.strip():
        raise protocol.invalid("The request body is empty; send a JSON object")
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise protocol.invalid(
            f"The request body is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise protocol.invalid(
            f"The request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
