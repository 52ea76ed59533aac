"""This machine's IPv4 interfaces, what kind each is, and where its subnet broadcast goes.

UDP discovery announces on every usable interface, best first: Thunderbolt and Ethernet,
then Wi-Fi, then anything unrecognised, then VPN and container interfaces; loopback is used
only when asked for (`--interface-type-filter loopback`, e.g. several nodes on one machine).
The broadcast address comes from each interface's real netmask, not an assumed /24.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("thunderbolt", "ethernet", "wifi", "other", "vpn", "container", "loopback")
PRIORITY = {
    "thunderbolt": 5,
    "ethernet": 4,
    "wifi": 3,
    "other": 2,
    "vpn": 1,
    "container": 1,
    "loopback": 0,
}

# Ordered: the first pattern that matches the interface name decides.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("loopback", re.compile(r"^lo\d*$")),
    (
        "container",
        re.compile(r"^(docker|br-|veth|virbr|cni|flannel|cali|lxc|lxd|podman|vmnet|vboxnet|weave|kube)"),
    ),
    ("vpn", re.compile(r"^(tun|tap|wg|tailscale|utun|zt|ppp|ipsec|nordlynx|gpd)")),
    ("thunderbolt", re.compile(r"^(thunderbolt|tb|bridge0$)")),
    ("wifi", re.compile(r"^(wl|wlan|wifi|ath|ra\d)")),
    ("ethernet", re.compile(r"^(eth|en|em|eno|ens|enp|enx|bond|end|usb)")),
)


@dataclass(frozen=True)
class Interface:
    name: str
    address: str
    netmask: str
    broadcast: str
    kind: str

    @property
    def priority(self) -> int:
        return PRIORITY[self.kind]


def interface_kind(name: str) -> str:
    """What an interface is, judged from its name (Linux and macOS conventions)."""
    lowered = name.lower()
    for kind, pattern in _PATTERNS:
        if pattern.match(lowered):
            return kind
    return "other"


def subnet_broadcast(address: str, netmask: str) -> str:
    """The directed broadcast address of address/netmask (the address itself for a /32)."""
    network = ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
    if network.prefixlen >= 31:
        return address if network.prefixlen == 32 else str(network.broadcast_address)
    return str(network.broadcast_address)


def ranked_interfaces(kinds: Iterable[str] | None = None) -> list[Interface]:
    """Up IPv4 interfaces, best first; `kinds` filters (default: every kind but loopback)."""
    import psutil

    wanted = set(kinds) if kinds else set(KINDS) - {"loopback"}
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(
            f"unknown interface type(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}"
        )
    stats = psutil.net_if_stats()
    found: list[Interface] = []
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        kind = interface_kind(name)
        if kind not in wanted:
            continue
        for addr in addrs:
            if addr.family != socket.AF_INET or not addr.netmask:
                continue
            try:
                broadcast = subnet_broadcast(addr.address, addr.netmask)
            except ValueError:
                continue
            found.append(Interface(name, addr.address, addr.netmask, broadcast, kind))
    return sorted(found, key=lambda i: (-i.priority, i.name, i.address))
