"""Model bytes between nodes: a node that has a GGUF's byte ranges serves them to its peers.

A small gRPC service of its own (`exo.Files`), registered on the node's peer server beside the
node service and reached over the same channel, so it has the same protection: with a cluster
key, only nodes holding a certificate of the cluster's CA get through the TLS handshake. Its
messages are JSON requests and raw byte chunks (a generic handler: no .proto to regenerate).

- `Have {"source": "org/repo:file.gguf"}` -> `{"size", "etag", "ranges": [[start, end), ...]}`:
  what this node holds of that file (a whole file is one range; a partial one, its manifest's).
- `Read {"source", "start", "end"}` -> a stream of chunks of bytes [start, end), refused
  (`NOT_FOUND`) unless every byte of it is on this node.
- `Downloads {}` -> `{"node_id", "data": [...]}`: this node's downloads (`GET /v1/downloads`
  shows the whole cluster's).
- `Prefetch {"model", "shard", "card"?}` -> `{"started": bool}`: start downloading what the
  shard needs (a hub model's card rides along for a node that never saw the id; from peers, then the hub) in the background, so every node a plan names downloads at once,
  before its first step arrives (`Prefetcher`; the engine's load then finds the bytes there, or
  waits on the file's lock for the download in progress).

Files are found by their hub source name only, through `exo_core.models.files` (EXO_HOME and
the seed directories); a request cannot name a path. `PeerFiles` is the client side, used by
`exo_core.models.download` from a worker thread while the node's event loop runs the channels.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import structlog

from exo_core.models.download import Holding, Manifest, Range, manifest_path
from exo_core.networking import wire

log = structlog.get_logger("exo.files")

SERVICE = "exo.Files"
HAVE = f"/{SERVICE}/Have"
READ = f"/{SERVICE}/Read"
PREFETCH = f"/{SERVICE}/Prefetch"
DOWNLOADS = f"/{SERVICE}/Downloads"
HUB_KINDS = ("gguf", "safetensors", "mlx")  # the source kinds downloads fetch
PREFETCH_AGAIN_S = 60.0  # a plan repeated within this long does not ask again
CHUNK = 1 << 20
HAVE_TIMEOUT = 5.0
CHUNK_TIMEOUT = 30.0  # a peer silent this long mid-transfer is given up on
_SOURCE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+:[\w.+-]+\.gguf$")
# A file of a safetensors repo: "org/repo/NAME", NAME one of what a shard download fetches.
_REPO_FILE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+/[\w.-]+$")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data)


def _raw(data: bytes) -> bytes:
    return data


def local_file(source: object) -> tuple[Path, Manifest] | None:
    """This node's file for a source and what of it is here (None when nothing): a hub GGUF
    ("org/repo:file.gguf", whole or partial) or a file of a safetensors repo ("org/repo/NAME")."""
    from exo_core.models import files

    if not isinstance(source, str) or ".." in source:
        return None
    if _REPO_FILE.match(source):
        repo, name = source.rsplit("/", 1)
        if not files.repo_file_wanted(name):
            return None
        directory = files.local_snapshot(repo)
        path = directory / name if directory is not None else None
        if path is None or not path.is_file():
            return None
        size = path.stat().st_size
        return path, Manifest(size, None, None, [(0, size)])
    if not _SOURCE.match(source):
        return None
    repo, filename = source.split(":", 1)
    for candidate in files._gguf_candidates(repo, filename):
        if not candidate.is_file():
            continue
        manifest = Manifest.load(manifest_path(candidate))
        if manifest is None:
            if manifest_path(candidate).exists():
                continue  # unreadable manifest: the bytes are not known to be good
            size = candidate.stat().st_size
            return candidate, Manifest(size, None, None, [(0, size)])
        if candidate.stat().st_size == manifest.size:
            return candidate, manifest
    return None


# ---- serving --------------------------------------------------------------------------------


async def _have(request: Any, context: grpc.aio.ServicerContext) -> Any:
    found = await asyncio.to_thread(local_file, request.get("source") if isinstance(request, dict) else None)
    if found is None:
        return {"size": 0, "etag": None, "ranges": []}
    _, manifest = found
    return {"size": manifest.size, "etag": manifest.etag, "ranges": manifest.ranges}


async def _read(request: Any, context: grpc.aio.ServicerContext) -> Any:
    try:
        source, start, end = request["source"], int(request["start"]), int(request["end"])
    except (KeyError, TypeError, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Read needs source, start and end")
    found = await asyncio.to_thread(local_file, source)
    if found is None or not (0 <= start < end) or not found[1].covers([(start, end)]):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"this node does not hold {source} [{start}, {end})")
        return
    path = found[0]
    with path.open("rb") as f:
        pos = start
        while pos < end:
            f.seek(pos)
            chunk = await asyncio.to_thread(f.read, min(CHUNK, end - pos))
            if not chunk:
                await context.abort(grpc.StatusCode.DATA_LOSS, f"{source} ends at {pos}")
            pos += len(chunk)
            yield chunk


def handler(node: Any = None) -> grpc.GenericRpcHandler:
    """The `exo.Files` service, for `server.add_generic_rpc_handlers` (Prefetch needs the node)."""
    prefetcher = Prefetcher(node) if node is not None else None

    async def prefetch(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if prefetcher is None or not isinstance(request, dict):
            return {"started": False}
        try:
            from exo_core.models.shard import Shard

            model, shard = str(request["model"]), Shard.from_dict(request["shard"])
            card = wire.card_from_dict(request["card"]) if request.get("card") else None
        except (KeyError, TypeError, ValueError, wire.WireError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Prefetch needs model and shard")
            return {"started": False}
        if card is not None and card.id == model:  # a hub model this node may never have seen
            node.stage.learn_card(card, via="prefetch")
        return {"started": prefetcher.local(model, shard)}

    async def downloads(request: Any, context: grpc.aio.ServicerContext) -> Any:
        from exo_core.models.progress import TRACKER

        node_id = getattr(node, "node_id", "")
        return {"node_id": node_id, "data": [d.to_dict() for d in TRACKER.snapshot()]}

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Prefetch": grpc.unary_unary_rpc_method_handler(
                prefetch, request_deserializer=_loads, response_serializer=_dumps
            ),
            "Downloads": grpc.unary_unary_rpc_method_handler(
                downloads, request_deserializer=_loads, response_serializer=_dumps
            ),
            "Have": grpc.unary_unary_rpc_method_handler(
                _have, request_deserializer=_loads, response_serializer=_dumps
            ),
            "Read": grpc.unary_stream_rpc_method_handler(
                _read, request_deserializer=_loads, response_serializer=_raw
            ),
        },
    )


# ---- fetching -------------------------------------------------------------------------------


_END = object()


class PeerFiles:
    """Asks the node's peers for file bytes; called from a worker thread (downloads run there)."""

    def __init__(self, channels: Callable[[], dict[str, grpc.aio.Channel]], loop: asyncio.AbstractEventLoop):
        self._channels = channels  # node id -> the peer's channel, as the node knows them now
        self._loop = loop

    def _on_loop(self) -> bool:
        """Called from the node's own event loop (it must not wait on itself)."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def have(self, source: str) -> list[Holding]:
        """Which peers hold bytes of `source`, and which."""

        async def ask(node_id: str, channel: grpc.aio.Channel) -> Holding | None:
            call = channel.unary_unary(HAVE, request_serializer=_dumps, response_deserializer=_loads)
            try:
                answer = await call({"source": source}, timeout=HAVE_TIMEOUT)
                ranges = [(int(a), int(b)) for a, b in answer.get("ranges", [])]
                size = int(answer.get("size", 0))
            except Exception as exc:  # an older node without the service, or one going away
                log.debug("peer has no files service", peer=node_id, error=str(exc))
                return None
            if size <= 0 or not ranges:
                return None
            return Holding(node_id, size, answer.get("etag"), ranges)

        async def ask_all() -> list[Holding]:
            channels = self._channels()
            found = await asyncio.gather(*(ask(n, c) for n, c in channels.items()))
            return [h for h in found if h is not None]

        if self._on_loop():
            ask_all().close()
            return []  # a download on the event loop's thread (none should be) goes to the hub
        try:
            return self._run(ask_all(), HAVE_TIMEOUT + 5)
        except Exception as exc:
            log.info("could not ask peers for files", error=str(exc))
            return []

    def read(self, node_id: str, source: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of `source` from one peer, in chunks; raises when the peer fails."""
        chunks: queue.Queue[Any] = queue.Queue(maxsize=8)
        channel = self._channels().get(node_id)
        if channel is None:
            raise ConnectionError(f"peer {node_id} is gone")

        async def pump() -> None:
            try:
                call = channel.unary_stream(READ, request_serializer=_dumps, response_deserializer=_raw)
                async for chunk in call({"source": source, "start": start, "end": end}):
                    await asyncio.to_thread(chunks.put, chunk)
                await asyncio.to_thread(chunks.put, _END)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await asyncio.to_thread(chunks.put, ConnectionError(f"peer {node_id}: {exc}"))

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                try:
                    item = chunks.get(timeout=CHUNK_TIMEOUT)
                except queue.Empty:
                    raise ConnectionError(f"peer {node_id} sent nothing for {CHUNK_TIMEOUT:.0f} s") from None
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()
            while not chunks.empty():  # unblock a pump waiting to put
                chunks.get_nowait()


def prefetch_kinds(engine: Any) -> list[str]:
    """The source kinds an engine's loads download (none for engines that read no weights:
    text engines, and any that set `downloads_weights = False`, like the dummy engine)."""
    if not getattr(engine, "downloads_weights", not getattr(engine, "works_on_text", False)):
        return []
    return [kind for kind in getattr(engine, "source_kinds", ()) if kind in HUB_KINDS]


class Prefetcher:
    """Downloads start when a plan names a node: on the origin, `plan_made` starts this node's
    shard downloading and asks every other node of the plan to start its own."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self._running: dict[tuple[str, Any], asyncio.Task[None]] = {}
        self._asked: dict[tuple[str, Any], float] = {}

    def local(self, model_id: str, shard: Any) -> bool:
        """Start downloading what `shard` needs on this node (once at a time); whether it did."""
        card = self.node.models.get(model_id)
        kinds = prefetch_kinds(self.node.engine)
        offered = [k for k in kinds if card is not None and k in card.sources]
        key = (model_id, shard)
        if not offered or key in self._running or shard in getattr(self.node.engine, "loaded_shards", ()):
            return False
        self._track(
            key, asyncio.get_running_loop().create_task(asyncio.to_thread(_download, card, shard, offered))
        )
        return True

    def _track(self, key: tuple[str, Any], task: asyncio.Task[None]) -> None:
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    def plan_made(self, card: Any, plan: Any) -> None:
        """Called by the origin with each plan it makes (on the event loop)."""
        import time

        now = time.monotonic()
        for stage in plan:
            key = (stage.node_id, stage.shard)
            if now - self._asked.get(key, -PREFETCH_AGAIN_S) < PREFETCH_AGAIN_S:
                continue
            self._asked[key] = now
            if stage.node_id == self.node.node_id:
                self.local(card.id, stage.shard)
                continue
            peer = self.node.peers.get(stage.node_id)
            channel = getattr(getattr(peer, "client", None), "channel", None)
            if channel is not None:
                self._track(key, asyncio.get_running_loop().create_task(_ask_prefetch(channel, card, stage)))
        if len(self._asked) > 1024:
            self._asked = {k: t for k, t in self._asked.items() if now - t < PREFETCH_AGAIN_S}


def _download(card: Any, shard: Any, kinds: list[str]) -> None:
    from exo_core.models.files import shard_checkpoint

    try:
        shard_checkpoint(card, shard, kinds)
    except Exception as exc:  # the stage's load reports it to the request; here it is a note
        log.info("download ahead of the first step failed", shard=str(shard), error=str(exc))


async def _ask_prefetch(channel: grpc.aio.Channel, card: Any, stage: Any) -> None:
    """Ask a peer to start downloading its shard; a hub model's card goes along (the peer may
    never have seen the id: it learns the card here, as from a first step)."""
    from exo_core.models.hub_cards import is_hub_id

    call = channel.unary_unary(PREFETCH, request_serializer=_dumps, response_deserializer=_loads)
    request = {"model": card.id, "shard": stage.shard.to_dict()}
    if is_hub_id(card.id):
        request["card"] = card.to_dict()
    try:
        await call(request, timeout=HAVE_TIMEOUT)
    except Exception as exc:  # an older peer, or one going away: its first step loads as before
        log.debug("peer did not take the prefetch", peer=stage.node_id, error=str(exc))


async def cluster_downloads(node: Any, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Every node's downloads: this node's, then each peer's (`{"node_id", "data"}`, with
    `"error"` for a peer that did not answer)."""
    from exo_core.models.progress import TRACKER

    async def ask(node_id: str, channel: grpc.aio.Channel) -> dict[str, Any]:
        call = channel.unary_unary(DOWNLOADS, request_serializer=_dumps, response_deserializer=_loads)
        try:
            answer = await call({}, timeout=timeout)
            return {"node_id": node_id, "data": list(answer.get("data", []))}
        except Exception as exc:
            return {"node_id": node_id, "data": [], "error": str(exc).splitlines()[0][:200]}

    own = {"node_id": node.node_id, "data": [d.to_dict() for d in TRACKER.snapshot()]}
    peers = await asyncio.gather(*(ask(n, c) for n, c in sorted(node_channels(node)().items())))
    return [own, *peers]


def node_channels(node: Any) -> Callable[[], dict[str, grpc.aio.Channel]]:
    """The channels of a node's peers (those reached over gRPC), looked up when called."""

    def channels() -> dict[str, grpc.aio.Channel]:
        out = {}
        for node_id, peer in list(node.peers.items()):
            channel = getattr(peer.client, "channel", None)
            if channel is not None:
                out[node_id] = channel
        return out

    return channels


__all__ = [
    "DOWNLOADS",
    "HAVE",
    "PREFETCH",
    "READ",
    "SERVICE",
    "PeerFiles",
    "Prefetcher",
    "Range",
    "cluster_downloads",
    "handler",
    "local_file",
    "node_channels",
    "prefetch_kinds",
]
