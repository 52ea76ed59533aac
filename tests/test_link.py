"""The link (one connection per peer) between two nodes in one process, over its own TLS socket
and over the gRPC stream it falls back to: messages are acknowledged, bad ones refused with a
reason, steps are posted (no acknowledgement) and a refused one, or one the link broke under,
reaches `on_lost_step`, and the link survives the peer restarting. A link port out of reach
falls back to gRPC; frames that are not the link's end the connection, not the node; a peer that
stops reading holds the sender back."""

import asyncio
import ssl
import time

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from exo_core.models.shard import Shard
from exo_core.networking import wire
from exo_core.networking.auth import TLS_NAME, ClusterAuth
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.networking.keys import ClusterKey
from exo_core.networking.link import MAX_MESSAGE_BYTES, LinkSender
from exo_core.node.messages import PeerTimeout, PeerUnavailable, RequestState, StepMessage
from exo_core.node.partitioning import PlanStage
from exo_core.node.sampling import SamplingParams
from exo_core.runtime import NodeConfig, Runtime
from exo_core.testing.cluster import NodeSpec, free_ports, write_peers_file

pytestmark = pytest.mark.timeout(60)


def _config(node_id, port, path):
    return NodeConfig(
        engine="dummy",
        node_id=node_id,
        node_host="127.0.0.1",
        node_port=port,
        discovery="manual",
        discovery_config_path=str(path),
        frontends=(),
    )


async def _until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.1)


async def _healthy(client):
    try:
        return await client.health() == RequestState.UNKNOWN
    except PeerUnavailable:
        return False


@pytest.fixture(params=["socket", "grpc"])
def transport(request, monkeypatch):
    if request.param == "grpc":
        monkeypatch.setenv("EXO_LINK", "grpc")
    return request.param


async def _pair(tmp_path):
    ports = free_ports(2)
    path = write_peers_file(tmp_path / "peers.json", [NodeSpec("a", ports[0], 0), NodeSpec("b", ports[1], 0)])
    a = Runtime(_config("a", ports[0], path))
    b = Runtime(_config("b", ports[1], path))
    await a.start()
    await b.start()
    await _until(lambda: asyncio.sleep(0, "b" in a.node.peers))
    return a, b, a.peer_tracker._tracked["b"].client


async def test_the_link_refuses_bad_messages_and_reopens_after_the_peer_restarts(tmp_path, transport):
    a, b, client = await _pair(tmp_path)
    try:
        assert await client.health() == RequestState.UNKNOWN
        assert client._link.transport == transport

        plan = (
            PlanStage("a", Shard("smollm2-135m", 0, 14, 30)),
            PlanStage("b", Shard("smollm2-135m", 15, 29, 30)),
        )
        step = StepMessage("r", 0, "a", plan, 0, SamplingParams(), 8, (), 0, tokens=np.zeros(3, np.int64))
        with pytest.raises(PeerUnavailable, match="stage 0 of this plan is a, not b"):
            await client._link.send("step", wire.step_to_pb(step), 5)  # acknowledged: refused
        lost = []
        client.on_lost_step = lambda origin, failure: lost.append((failure.request_id, failure))
        await client.send_step(step)  # posted: returns once written; the refusal comes later
        await _until(lambda: asyncio.sleep(0, bool(lost)))
        ((request_id, failure),) = lost
        assert request_id == "r" and failure.node_id == "b" and failure.attempt == 0
        assert "stage 0 of this plan is a, not b" in failure.reason
        lost.clear()
        bad = wire.step_to_pb(step)
        bad.stage_index = 1
        bad.ClearField("tokens")
        with pytest.raises(PeerUnavailable, match="malformed step: a step carries either tokens or hidden"):
            await client._link.send("step", bad, 5)
        assert await client.health() == RequestState.UNKNOWN  # the same link goes on

        hidden = np.zeros((3, 8), np.float32)
        await client.send_step(StepMessage("r2", 0, "a", plan, 1, SamplingParams(), 8, (), 0, hidden=hidden))
        await b.stop()  # the link breaks right after a posted step: its fate is unknown, it is lost
        await _until(lambda: asyncio.sleep(0, bool(lost)))
        assert [(request_id, failure.node_id) for request_id, failure in lost] == [("r2", "b")]
        with pytest.raises(PeerUnavailable):
            await client.health()
        b = Runtime(b.config)  # the same port and peers file
        await b.start()
        await _until(lambda: _healthy(client))  # the same client: a new connection
        assert client._link.transport == transport
    finally:
        await b.stop()
        await a.stop()


async def test_a_link_port_out_of_reach_falls_back_to_grpc(tmp_path):
    a, b, client = await _pair(tmp_path)
    try:
        assert await client.health() == RequestState.UNKNOWN
        assert client._link.transport == "socket"
        await b.server.link.close()  # b still announces its link port; nobody listens there
        with capture_logs() as logs:
            await _until(lambda: _healthy(client))
        assert client._link.transport == "grpc"
        warnings = [e["event"] for e in logs if "cannot reach the link port" in e["event"]]
        assert len(warnings) == 1 and "--link-port" in warnings[0], logs
        assert await client.health() == RequestState.UNKNOWN
    finally:
        await b.stop()
        await a.stop()


async def test_frames_that_are_not_the_links_end_the_connection_not_the_node(tmp_path):
    a, b, client = await _pair(tmp_path)
    tls = a.cluster_auth.ssl_context(server=False)  # a member's certificate: the handshake passes
    port = b.node.link_port

    async def send_raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname=TLS_NAME)
        writer.write(data)
        got = await asyncio.wait_for(reader.read(), 5)  # b closes the connection
        writer.close()
        return got

    try:
        with capture_logs() as logs:
            assert await send_raw((MAX_MESSAGE_BYTES + 1).to_bytes(4, "big")) == b""
            assert await send_raw((5).to_bytes(4, "big") + b"\xff\xff\xff\xff\xff") == b""
        reasons = [e["reason"] for e in logs if e["event"] == "closed a peer's link"]
        assert reasons == [
            f"a message of {MAX_MESSAGE_BYTES + 1} bytes (at most {MAX_MESSAGE_BYTES})",
            "not a link message",
        ]
        # no certificate: the handshake fails, nothing reaches the node
        bare = ssl.create_default_context(cadata=a.cluster_auth.ca_pem.decode())
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=bare, server_hostname=TLS_NAME
            )
            writer.write(b"\x00\x00\x00\x00")
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 5)
        assert await client.health() == RequestState.UNKNOWN  # b goes on
        assert client._link.transport == "socket"
    finally:
        await b.stop()
        await a.stop()


async def test_a_peer_that_stops_reading_holds_the_sender_back():
    """Flow control: frames to a peer that accepts the connection but never reads fill the socket's
    buffers, then a post waits, and gives up with PeerTimeout after its timeout (memory does
    not grow without bound)."""

    auth = ClusterAuth(ClusterKey.generate(), "x")
    stalled = asyncio.Event()

    async def never_read(reader, writer):
        await stalled.wait()
        writer.close()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0, ssl=auth.ssl_context(server=True))
    port = server.sockets[0].getsockname()[1]

    async def link_port():
        return port

    channel = grpc.aio.insecure_channel("127.0.0.1:1")  # never used: the link port answers
    sender = LinkSender(
        channel, "stalled", host="127.0.0.1", port_source=link_port, tls=auth.ssl_context(server=False)
    )
    body = pb.StepRequest(
        request_id="r", hidden=pb.Tensor(data=bytes(1 << 20), dtype="float32", shape=[1, 1 << 18])
    )
    written = 0
    try:
        with pytest.raises(PeerTimeout, match="not written within 1 s"):
            for _ in range(1000):  # 1 GB if nothing held the sender back
                await sender.post("step", body, 1.0, "r", lambda reason: None)
                written += 1
        assert sender.transport == "socket"
        assert 0 < written < 100, written  # socket buffers take a few MB, then it waits
    finally:
        stalled.set()
        await sender.close()
        await channel.close()
        server.close()
