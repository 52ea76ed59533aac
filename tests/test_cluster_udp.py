"""UDP discovery between real `exo` processes: on loopback, and between network namespaces joined
by a bridge (created and removed here; needs root and `ip netns`, skipped otherwise)."""

import subprocess
import uuid

import pytest
from core_helpers import can_make_namespaces as _can_make_namespaces
from core_helpers import udp_args, wait_until

from exo_core.engines.dummy import DUMMY_ANSWER
from exo_core.networking.interfaces import interface_kind, ranked_interfaces, subnet_broadcast
from exo_core.testing.cluster import Cluster, NodeSpec, free_ports

CHAT = [{"role": "user", "content": "Say hello."}]


def _udp_args(spec, *extra):
    return udp_args(spec, "--api-host", "127.0.0.1", "--discovery-timeout", "4", *extra)


def _peer_ids(cluster, node_id):
    status, topo = cluster.get(node_id, "/v1/topology")
    assert status == 200, topo
    return {n["node_id"] for n in topo["nodes"]} - {node_id}


def test_udp_discovery_on_loopback(tmp_path):
    """Loopback variant (runs everywhere): filters, a node with another key, and a dropped peer."""
    ports = free_ports(9)
    bport = str(ports[8])
    common = ["--interface-type-filter", "loopback", "--broadcast-port", bport]
    specs = {nid: NodeSpec(nid, ports[2 * i], ports[2 * i + 1]) for i, nid in enumerate("abcd")}
    cluster = Cluster()
    try:
        cluster.add(specs["a"], _udp_args(specs["a"], *common, "--wait-for-peers", "2"), tmp_path)
        cluster.add(specs["b"], _udp_args(specs["b"], *common, "--wait-for-peers", "1"), tmp_path)
        cluster.add(specs["c"], _udp_args(specs["c"], *common, "--node-id-filter", "a"), tmp_path)
        cluster.add(specs["d"], _udp_args(specs["d"], *common), tmp_path, env={"EXO_CLUSTER_TOKEN": "other"})
        cluster.wait_ready(60)
        assert wait_until(lambda: _peer_ids(cluster, "a") == {"b", "c"} and _peer_ids(cluster, "c") == {"a"})
        assert wait_until(lambda: _peer_ids(cluster, "b") == {"a", "c"})
        assert _peer_ids(cluster, "d") == set()  # its key differs: nobody gets in either way
        assert "node a at 127.0.0.1 has another cluster key" in cluster.nodes["d"].log()
        assert "node d at 127.0.0.1 has another cluster key" in cluster.nodes["a"].log()
        assert cluster.chat("b", CHAT) == DUMMY_ANSWER  # a 3-stage plan found by broadcast

        cluster.nodes["c"].kill()  # dropped after failed health checks / the discovery timeout
        assert wait_until(lambda: _peer_ids(cluster, "a") == {"b"}, timeout=10), cluster.logs()
        assert cluster.chat("a", CHAT) == DUMMY_ANSWER
    finally:
        cluster.close()


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.mark.netns
@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and `ip netns` (the loopback variant ran)")
def test_udp_discovery_between_network_namespaces(tmp_path):
    """Three namespaces on one bridge, a /20 subnet (the broadcast must come from the real
    netmask), each node seeing only its own `eth0`; the default port 5678 and default filter."""
    tag = uuid.uuid4().hex[:6]
    bridge_ns = f"exo-{tag}-br"
    cluster = Cluster()
    cluster.namespaces.append(bridge_ns)
    try:
        _ip("netns", "add", bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        ids = ["a", "b", "c"]
        for i, nid in enumerate(ids):
            ns = f"exo-{tag}-{nid}"
            cluster.namespaces.append(ns)
            _ip("netns", "add", ns)
            veth = ["type", "veth", "peer", "name", f"v{i}", "netns", bridge_ns]
            _ip("link", "add", "eth0", "netns", ns, *veth)
            _ip("-n", bridge_ns, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"10.213.{i}.1/20", "dev", "eth0")  # broadcast 10.213.15.255
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            spec = NodeSpec(nid, 50051, 52415, host="127.0.0.1", netns=ns)
            cluster.add(spec, _udp_args(spec, "--wait-for-peers", "2"), tmp_path)
        cluster.wait_ready(90)
        for nid in ids:
            assert _peer_ids(cluster, nid) == set(ids) - {nid}
        _status, topo = cluster.get("a", "/v1/topology")
        assert {n["node_id"]: n["address"] for n in topo["nodes"] if n["node_id"] != "a"} == {
            "b": "10.213.1.1",
            "c": "10.213.2.1",
        }
        assert cluster.chat("c", CHAT) == DUMMY_ANSWER
    finally:
        cluster.close()
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert tag not in leftover


def test_interface_kinds_and_ranking():
    assert interface_kind("eth0") == interface_kind("enp3s0") == interface_kind("en0") == "ethernet"
    assert interface_kind("wlan0") == interface_kind("wlp2s0") == "wifi"
    assert interface_kind("thunderbolt0") == interface_kind("bridge0") == "thunderbolt"
    assert interface_kind("docker0") == interface_kind("br-1a2b") == interface_kind("veth12") == "container"
    assert interface_kind("tailscale0") == interface_kind("wg0") == interface_kind("utun3") == "vpn"
    assert interface_kind("lo") == "loopback"
    assert subnet_broadcast("10.1.2.3", "255.255.240.0") == "10.1.15.255"
    assert subnet_broadcast("192.168.7.9", "255.255.255.0") == "192.168.7.255"
    assert subnet_broadcast("100.64.1.1", "255.255.255.255") == "100.64.1.1"
    assert all(i.kind == "loopback" for i in ranked_interfaces(["loopback"]))
    assert all(i.kind != "loopback" for i in ranked_interfaces())
    with pytest.raises(ValueError, match="unknown interface type"):
        ranked_interfaces(["carrier-pigeon"])
