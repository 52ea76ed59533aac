"""Secure by default, with real `exo` processes: the cluster key, mutual TLS on peer links, signed
announcements, --insecure, and an API that stays on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from core_helpers import can_make_namespaces as _can_make_namespaces
from core_helpers import udp_args, wait_until

from exo_core.cli import build_cli
from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.networking import keys
from exo_core.networking.auth import ClusterAuth
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.networking.generated import node_service_pb2_grpc as pb_grpc
from exo_core.networking.keys import ClusterKey, ClusterKeyError
from exo_core.testing.cluster import Cluster, NodeSpec, free_ports, write_peers_file

CHAT = [{"role": "user", "content": "Say hello."}]


def _manual_args(spec: NodeSpec, peers_file: Path, *extra: str, host: str = "127.0.0.1") -> list[str]:
    return [
        "--engine",
        "dummy",
        "--node-id",
        spec.node_id,
        "--node-host",
        host,
        "--node-port",
        str(spec.node_port),
        "--api-port",
        str(spec.api_port),
        "--discovery-module",
        "manual",
        "--discovery-config-path",
        str(peers_file),
        *extra,
    ]


def _members(cluster: Cluster, node_id: str) -> set[str]:
    status, topo = cluster.get(node_id, "/v1/topology")
    assert status == 200, topo
    return {n["node_id"] for n in topo["nodes"]}


class Recorder:
    """A TCP relay on 127.0.0.1 that keeps every byte the client sent (what a sniffer would see)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_port = target_port
        self.target_host = target_host
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.target_host, self.target_port))
            except OSError:  # the node is not listening yet
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_default_nodes_with_one_token_form_a_cluster_and_strangers_stay_out(tmp_path):
    """a and b share a token; c has another key; d runs --insecure. Only a and b plan together,
    each stranger is named once in the log, and a raw gRPC call without a certificate fails."""
    ports = free_ports(8)
    specs = {nid: NodeSpec(nid, ports[2 * i], ports[2 * i + 1]) for i, nid in enumerate("abcd")}
    peers = write_peers_file(tmp_path / "peers.json", list(specs.values()))
    cluster = Cluster()
    try:
        cluster.add(specs["a"], _manual_args(specs["a"], peers, "--wait-for-peers", "1"), tmp_path)
        cluster.add(specs["b"], _manual_args(specs["b"], peers, "--wait-for-peers", "1"), tmp_path)
        cluster.add(specs["c"], _manual_args(specs["c"], peers), tmp_path, env={"EXO_CLUSTER_TOKEN": ""})
        cluster.add(specs["d"], _manual_args(specs["d"], peers, "--insecure"), tmp_path)
        cluster.wait_ready(60)
        assert _members(cluster, "a") == _members(cluster, "b") == {"a", "b"}
        assert _members(cluster, "c") == {"c"}
        assert _members(cluster, "d") == {"d"}
        assert cluster.chat("b", CHAT) == DUMMY_ANSWER
        time.sleep(3)  # several discovery rounds: still one line per stranger
        log_a = cluster.nodes["a"].log()
        for stranger in ("c", "d"):
            port = specs[stranger].node_port
            line = (
                f"node {stranger} at 127.0.0.1:{port} has another cluster key (or none); run it with --join"
            )
            assert log_a.count(line) == 1, log_a[-3000:]
        assert "node a at 127.0.0.1" in cluster.nodes["c"].log()
        assert "this node runs --insecure" in cluster.nodes["d"].log(), cluster.nodes["d"].log()
        assert "--insecure: peer links are plaintext" in cluster.nodes["d"].log()
        # c made a key of its own on first start, kept (owner-only) under its EXO_HOME
        key_file = tmp_path / "home-c" / "cluster_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert "created this cluster's key" in cluster.nodes["c"].log()

        target = f"127.0.0.1:{specs['a'].node_port}"
        with grpc.insecure_channel(target) as channel:  # plaintext: not even a TLS handshake
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.NodeServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = ClusterAuth(ClusterKey.generate(), "x")
        creds = grpc.ssl_channel_credentials(stranger.ca_pem)  # TLS, trusting the wrong CA, no cert
        with grpc.secure_channel(target, creds, stranger.channel_options) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.NodeServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "handshake" in info.value.details().lower()
        member = ClusterAuth(ClusterKey.from_token(cluster.token), "test")
        creds = grpc.ssl_channel_credentials(member.ca_pem)  # the right CA, but no client certificate
        with grpc.secure_channel(target, creds, member.channel_options) as channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.NodeServiceStub(channel).Health(pb.HealthRequest(), timeout=5)
        with grpc.secure_channel(target, member.channel_credentials(), member.channel_options) as channel:
            assert pb_grpc.NodeServiceStub(channel).Health(pb.HealthRequest(), timeout=5).node_id == "a"

        # The token went through the environment: not in `ps`, not in any log.
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        assert cluster.token not in ps
        for process in cluster.nodes.values():
            assert cluster.token not in process.log()
        assert keys.load(tmp_path / "home-c").token not in cluster.nodes["c"].log()
    finally:
        cluster.close()


def test_a_captured_step_cannot_be_read_or_replayed(tmp_path):
    """Record what b sends a (through relays on both of a's ports: gRPC and the link), then
    replay those bytes to a and to c: nothing is accepted, and the recording holds none of the
    request's plaintext."""
    ids = ["node-alpha-5e1f", "node-bravo-77c2", "node-charlie-09ad"]
    a, b, c = ids
    ports = free_ports(8)
    specs = {nid: NodeSpec(nid, ports[2 * i], ports[2 * i + 1], memory=2000 - i) for i, nid in enumerate(ids)}
    link_ports = {a: ports[6], c: ports[7]}
    # a listens on 127.0.0.2; b reaches it on 127.0.0.1 through the relays (same port numbers
    # for the link, which b learns from a itself)
    relay = Recorder(specs[a].node_port, "127.0.0.2")
    link_relay = Recorder(link_ports[a], "127.0.0.2", port=link_ports[a])
    listed = [NodeSpec(a, relay.port, 0, memory=2000), specs[b]]
    peers = write_peers_file(tmp_path / "peers.json", listed)
    lone = write_peers_file(tmp_path / "lone.json", [specs[c]])
    cluster = Cluster()
    try:
        link_a = ("--link-port", str(link_ports[a]), "--wait-for-peers", "1")
        cluster.add(specs[a], _manual_args(specs[a], peers, *link_a, host="127.0.0.2"), tmp_path)
        cluster.add(specs[b], _manual_args(specs[b], peers, "--wait-for-peers", "1"), tmp_path)
        cluster.add(specs[c], _manual_args(specs[c], lone, "--link-port", str(link_ports[c])), tmp_path)
        cluster.wait_ready(60)
        _, topo = cluster.get(b, "/v1/topology")
        assert [s["node_id"] for s in topo["plan"]] == [a, b]  # b's requests start on a
        secret_words = "purple-elephant-umbrella"
        chat = [{"role": "user", "content": f"Remember {secret_words}."}]
        assert cluster.chat(b, chat) == DUMMY_ANSWER
        captured = {"grpc": bytes(relay.sent), "link": bytes(link_relay.sent)}
        assert len(captured["grpc"]) > 1000
        assert len(captured["link"]) > 1000  # the steps went over the link, through its relay
        for plain in (secret_words.encode(), a.encode(), b.encode(), b"SendStep"):
            assert all(plain not in data for data in captured.values())

        for target, host in ((a, "127.0.0.2"), (c, "127.0.0.1")):
            for port, data in (
                (specs[target].node_port, captured["grpc"]),
                (link_ports[target], captured["link"]),
            ):
                with socket.create_connection((host, port), timeout=5) as s:
                    try:
                        s.sendall(data)
                        s.settimeout(2)
                        while s.recv(65536):
                            pass
                    except OSError:
                        pass  # the node closed the connection on the bad handshake
        time.sleep(0.5)
        for target in (a, c):
            _, topo = cluster.get(target, "/v1/topology")
            assert all(n["active_requests"] == 0 for n in topo["nodes"]), topo
            assert "refused peer message" not in cluster.nodes[target].log()
            assert "closed a peer's link" not in cluster.nodes[target].log()
        assert cluster.chat(b, CHAT) == DUMMY_ANSWER
    finally:
        relay.close()
        link_relay.close()
        cluster.close()


def _udp_args(spec: NodeSpec, bport: int, *extra: str) -> list[str]:
    return udp_args(spec, "--interface-type-filter", "loopback", "--broadcast-port", str(bport), *extra)


def _listen_udp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", port))
    sock.settimeout(10)
    return sock


def _two_udp_nodes() -> tuple[dict[str, NodeSpec], int, socket.socket]:
    """Specs of nodes a and b, a free broadcast port for them, and a socket that hears it."""
    ports = free_ports(5)
    bport = ports[4]
    specs = {nid: NodeSpec(nid, ports[2 * i], ports[2 * i + 1]) for i, nid in enumerate("ab")}
    return specs, bport, _listen_udp(bport)


def test_replayed_or_junk_announcements_do_not_move_a_peer(tmp_path):
    specs, bport, listener = _two_udp_nodes()
    cluster = Cluster()
    try:
        cluster.add(specs["a"], _udp_args(specs["a"], bport, "--wait-for-peers", "1"), tmp_path)
        cluster.add(specs["b"], _udp_args(specs["b"], bport, "--wait-for-peers", "1"), tmp_path)
        cluster.wait_ready(60)
        while True:  # an announcement of b, as anyone on the LAN hears it
            data, source = listener.recvfrom(9000)
            if json.loads(data)["node_id"] == "b":
                break
        assert source[0] == "127.0.0.1"
        announcement = json.loads(data)
        assert announcement["address"] == "127.0.0.1" and isinstance(announcement["seq"], int)

        def send_from(address: str, payload: bytes) -> None:
            # to loopback's broadcast address, as the nodes announce: a unicast datagram would
            # reach only one of the sockets sharing the port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                s.bind((address, 0))
                s.sendto(payload, ("127.255.255.255", bport))

        send_from("127.0.0.2", data)  # the same bytes from another address
        time.sleep(2.5)  # b announces again: the captured one is now older than the last heard
        send_from("127.0.0.1", data)  # replayed from b's own address: not newer
        moved = {**announcement, "address": "127.0.0.2", "seq": announcement["seq"] + 10**12}
        send_from("127.0.0.2", json.dumps(moved).encode())  # re-addressed: the signature breaks
        for junk in (
            b"\xff\xfe not json",
            b"[]",
            json.dumps({**announcement, "sig": "é" * 64}).encode(),  # a non-ASCII signature
            json.dumps({**announcement, "sig": None, "seq": "x"}).encode(),
            json.dumps({"type": "exo-discovery", "node_id": ["x"], "sig": 5}).encode(),
            b"{" * 5000,
        ):
            send_from("127.0.0.1", junk)
        time.sleep(2.5)  # the next real announcements arrive too
        assert cluster.nodes["a"].alive()
        _, topo = cluster.get("a", "/v1/topology")
        assert {n["node_id"]: n["address"] for n in topo["nodes"]}["b"] == "127.0.0.1"
        log_a = cluster.nodes["a"].log()
        assert "replayed: signed for 127.0.0.1, heard from 127.0.0.2" in log_a
        assert "replayed: not newer than one already heard" in log_a
        assert "Traceback" not in log_a
        assert cluster.chat("a", CHAT) == DUMMY_ANSWER
    finally:
        listener.close()
        cluster.close()


def test_insecure_nodes_form_an_open_cluster(tmp_path):
    specs, bport, listener = _two_udp_nodes()
    cluster = Cluster()
    try:
        for nid in "ab":
            args = _udp_args(specs[nid], bport, "--insecure", "--wait-for-peers", "1")
            cluster.add(specs[nid], args, tmp_path, env={"EXO_CLUSTER_TOKEN": ""})
        cluster.wait_ready(60)
        assert _members(cluster, "a") == {"a", "b"}
        assert cluster.chat("b", CHAT) == DUMMY_ANSWER
        data, _ = listener.recvfrom(9000)
        assert "sig" not in json.loads(data)  # nothing to sign with
        with grpc.insecure_channel(f"127.0.0.1:{specs['a'].node_port}") as channel:
            assert pb_grpc.NodeServiceStub(channel).Health(pb.HealthRequest(), timeout=5).node_id == "a"
        assert "--insecure: peer links are plaintext" in cluster.nodes["a"].log()
        assert not (tmp_path / "home-a" / "cluster_key").exists()
    finally:
        listener.close()
        cluster.close()


def _reachable_in(ns: str, host: str, port: int) -> bool:
    code = (
        "import socket,sys\n"
        "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('yes')\n"
        "except OSError:\n print('no')\n"
    )
    cmd = ["ip", "netns", "exec", ns, shutil.which("python3") or "python3", "-c", code, host, str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip() == "yes"


@pytest.mark.netns
@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and `ip netns`")
def test_the_api_is_not_reachable_on_the_lan_address_by_default(tmp_path):
    """A node in a namespace whose eth0 is 10.215.0.1: by default its API answers on 127.0.0.1
    only; with --api-host 0.0.0.0 it is reachable on 10.215.0.1, and it warns without a key."""
    ns = f"exo-{uuid.uuid4().hex[:6]}-api"
    cluster = Cluster(namespaces=[ns])
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        for cmd in (
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["addr", "add", "10.215.0.1/24", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "eth1", "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True)
        quiet = ["--engine", "dummy", "--discovery-module", "none", "--node-id"]
        cluster.add(NodeSpec("a", 0, 52415, netns=ns), [*quiet, "a"], tmp_path)
        cluster.add(
            NodeSpec("b", 0, 52416, netns=ns),
            [*quiet, "b", "--api-host", "0.0.0.0", "--api-port", "52416"],
            tmp_path,
        )
        cluster.add(
            NodeSpec("c", 0, 52417, netns=ns),
            [*quiet, "c", "--api-host", "0.0.0.0", "--api-key", "k", "--api-port", "52417"],
            tmp_path,
        )
        cluster.wait_ready(60, ["a"])
        assert wait_until(lambda: _reachable_in(ns, "10.215.0.1", 52416), 30)
        assert wait_until(lambda: _reachable_in(ns, "127.0.0.1", 52417), 30)
        assert _reachable_in(ns, "127.0.0.1", 52415)
        assert not _reachable_in(ns, "10.215.0.1", 52415)
        assert "without --api-key" in cluster.nodes["b"].log()
        assert "without --api-key" not in cluster.nodes["a"].log() + cluster.nodes["c"].log()
    finally:
        cluster.close()


# ---- the key and the token --------------------------------------------------------------------


def test_tokens_round_trip_and_bad_ones_say_what_to_do(tmp_path):
    key = ClusterKey.generate()
    assert ClusterKey.from_token(key.token) == key
    assert ClusterKey.from_token(f"  {key.token}\n") == key
    assert key.token not in repr(key) and key.fingerprint in repr(key)
    assert ClusterKey.from_token("s3cret") == ClusterKey.from_token("s3cret")  # old --cluster-secret
    assert ClusterKey.from_token("s3cret") != ClusterKey.from_token("s3cres")
    for bad in (key.token[:-3], key.token + "A", "exo1_!!!!", "exo1_"):
        with pytest.raises(ClusterKeyError, match="not a valid join token"):
            ClusterKey.from_token(bad)
    with pytest.raises(ClusterKeyError, match="exo token"):
        ClusterKey.from_token("  ")
    assert key.derive("a") != key.derive("b") and len(key.derive("a", 48)) == 48
    created, fresh = keys.load_or_create(tmp_path)
    assert fresh and keys.load_or_create(tmp_path) == (created, False)
    (tmp_path / "cluster_key").write_text("garbage")
    with pytest.raises(ClusterKeyError, match="damaged; delete it"):
        keys.load(tmp_path)


def test_exo_token_prints_the_same_key_exo_run_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_HOME", str(tmp_path))
    runner = CliRunner()
    first = runner.invoke(build_cli(), ["token"])
    assert first.exit_code == 0, first.output
    token = first.output.strip()
    assert runner.invoke(build_cli(), ["token"]).output.strip() == token
    assert keys.load(tmp_path) == ClusterKey.from_token(token)
    both = runner.invoke(build_cli(), ["run", "--insecure", "--join", token, "--engine", "dummy"])
    assert both.exit_code == 2 and "not both" in both.output
    bad = runner.invoke(
        build_cli(),
        ["run", "--engine", "dummy", "--discovery-module", "manual", "--prompt", "hi"],
        env={"EXO_CLUSTER_TOKEN": token[:-4]},
    )
    assert bad.exit_code == 2 and "not a valid join token" in bad.output, bad.output


def test_announcements_are_signed_over_everything():
    key = ClusterKey.generate()
    sender, receiver = ClusterAuth(key, "s"), ClusterAuth(key, "r")
    first = sender.sign_announcement({"node_id": "s", "grpc_port": 1}, "10.0.0.5")
    second = sender.sign_announcement({"node_id": "s", "grpc_port": 1}, "10.0.0.5")
    assert second["seq"] > first["seq"]
    assert receiver.check_announcement(second, "10.0.0.5") is None
    assert "not newer" in receiver.check_announcement(first, "10.0.0.5")
    assert receiver.check_announcement(second, "10.0.0.5") == "duplicate"  # heard twice: dropped quietly
    third = sender.sign_announcement({"node_id": "s", "grpc_port": 1}, "10.0.0.5")
    assert "heard from 10.0.0.9" in receiver.check_announcement(third, "10.0.0.9")
    for field, value in (("grpc_port", 2), ("address", "10.0.0.9"), ("seq", third["seq"] + 1)):
        assert "another cluster key" in receiver.check_announcement({**third, field: value}, "10.0.0.9")
    other = ClusterAuth(ClusterKey.generate(), "o")
    assert "another cluster key" in other.check_announcement(third, "10.0.0.5")
    assert "unsigned" in receiver.check_announcement({"node_id": "x"}, "10.0.0.5")
    assert "another cluster key" in receiver.check_announcement({**third, "sig": "é" * 64}, "10.0.0.5")
    assert receiver.check_announcement(third, "10.0.0.5") is None
