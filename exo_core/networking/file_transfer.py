"""Model bytes between nodes: a node that has a GGUF's byte ranges serves them to its peers.

A small gRPC service of its own (`exo.Files`), registered on the node's peer server beside the
node service and reached over the same channel, so it has the same protection: with a cluster
key, only nodes holding a certificate of the cluster's CA get through the TLS handshake. Its
messages are JSON requests and raw byte chunks (a generic handler: no .proto to regenerate).

- `Have {"source": "org/repo:file.gguf"}` -> `{"size", "etag", "ranges": [[start, end), ...]}`:
  what this node holds of that file (a whole file is one range; a partial one, its manifest's).
- `Read {"source", "start", "end"}` -> a stream of chunks of bytes [start, end), refused
  (`NOT_FOUND`) unless every byte of it is on this node.

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

log = structlog.get_logger("exo.files")

SERVICE = "exo.Files"
HAVE = f"/{SERVICE}/Have"
READ = f"/{SERVICE}/Read"
CHUNK = 1 << 20
HAVE_TIMEOUT = 5.0
CHUNK_TIMEOUT = 30.0  # a peer silent this long mid-transfer is given up on
_SOURCE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+:[\w.+-]+\.gguf$")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data)


def _raw(data: bytes) -> bytes:
    return data


def local_file(source: object) -> tuple[Path, Manifest] | None:
    """This node's file for a hub GGUF source and what of it is here (None when nothing)."""
    from exo_core.models import files

    if not isinstance(source, str) or not _SOURCE.match(source) or ".." in source:
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


def handler() -> grpc.GenericRpcHandler:
    """The `exo.Files` service, for `server.add_generic_rpc_handlers`."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
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


__all__ = ["HAVE", "READ", "SERVICE", "PeerFiles", "Range", "handler", "local_file", "node_channels"]
