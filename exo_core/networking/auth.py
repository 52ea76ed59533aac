"""Cluster membership from the cluster key: mutual TLS on every peer link, signed announcements.

Every node derives the same certificate authority from the cluster key (HKDF -> an ECDSA P-256
key), makes itself a fresh key pair at start and signs its own certificate with that CA. Peer
links are gRPC over TLS 1.3 where both sides must show a certificate of the cluster's CA: a
node without the key cannot complete a handshake, so it cannot read steps or prompts, inject
one, or replay a captured call (TLS records are bound to their session). The CA's private key
exists only in memory, re-derived from the key; no certificate files are kept.

Peers are addressed by IP, so certificates name a fixed host (`TLS_NAME`) that every client
asks for; identity is the CA, not a hostname.

Announcements (UDP, Tailscale attributes) carry an HMAC over their whole content, including
the sender's address and a sequence number that only grows: a copy heard from another address,
or an older one, is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import ssl
import tempfile
import threading
import time
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exo_core.networking.keys import ClusterKey

TLS_NAME = "exo-node"  # the name in every node certificate (peers are addressed by IP)
WINDOW_S = 120.0  # announcements older than this (or from a clock this far off) are refused
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_PEM = serialization.Encoding.PEM


def _cluster_ca(key: ClusterKey) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The cluster's CA: the same key on every node holding the cluster key."""
    scalar = int.from_bytes(key.derive("tls-ca", 48)) % (_P256_ORDER - 1) + 1
    private = ec.derive_private_key(scalar, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"exo cluster {key.fingerprint}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    return private, cert


def _node_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, node_id: str
) -> tuple[bytes, bytes]:
    """A fresh key pair for this node and its certificate from the cluster CA (PEM)."""
    private = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id[:64] or "exo")]))
        .issuer_name(ca_cert.subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))  # a peer's clock may be behind
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = private.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return key_pem, cert.public_bytes(_PEM)


class ClusterAuth:
    """One node's membership: its TLS credentials and the announcement signer of its cluster."""

    def __init__(self, key: ClusterKey, node_id: str) -> None:
        self.key = key
        ca_key, ca_cert = _cluster_ca(key)
        self.ca_pem = ca_cert.public_bytes(_PEM)
        self._key_pem, self.cert_pem = _node_certificate(ca_key, ca_cert, node_id)
        self._announce_key = key.derive("announcements")
        self._seq = time.time_ns()  # grows across restarts too
        self._seq_lock = threading.Lock()
        self._last_seq: dict[str, int] = {}
        self._ssl: dict[bool, ssl.SSLContext] = {}

    def __repr__(self) -> str:
        return f"ClusterAuth(key {self.key.fingerprint})"

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    # ---- TLS -----------------------------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self._key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self._key_pem, self.cert_pem)

    channel_options: tuple[tuple[str, Any], ...] = (("grpc.ssl_target_name_override", TLS_NAME),)

    def ssl_context(self, *, server: bool) -> ssl.SSLContext:
        """The same mutual TLS for the link's own sockets (exo_core.networking.link): TLS 1.3,
        a certificate of the cluster's CA required on both sides (one context for each side)."""
        if server in self._ssl:
            return self._ssl[server]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        # The ssl module loads a key from a file only: one readable by this user alone, gone at once.
        fd, path = tempfile.mkstemp(prefix="exo-node-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._key_pem + self.cert_pem)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        self._ssl[server] = ctx
        return ctx

    # ---- announcements ---------------------------------------------------------------------------

    def next_seq(self) -> int:
        with self._seq_lock:
            self._seq = max(self._seq + 1, time.time_ns())
            return self._seq

    def mac(self, text: str, length: int = 64) -> str:
        """A hex HMAC-SHA256 of `text` under the announcement key (`length` hex digits)."""
        return hmac.new(self._announce_key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:length]

    def verify_mac(self, text: str, sig: Any, length: int = 64) -> bool:
        if not isinstance(sig, str) or len(sig) != length or not sig.isascii():
            return False
        return hmac.compare_digest(sig, self.mac(text, length))

    def sign_announcement(self, message: dict[str, Any], address: str) -> dict[str, Any]:
        """`message` with the address it is sent from, a timestamp, a sequence number and a `sig`."""
        body = {k: v for k, v in message.items() if k != "sig"}
        body.update(address=address, ts=time.time(), seq=self.next_seq())
        return {**body, "sig": self.mac(canonical(body))}

    def check_announcement(
        self, message: dict[str, Any], source: str, now: float | None = None
    ) -> str | None:
        """None when the announcement is genuine, fresh and from `source`; else why not.

        A message whose signature fails starts with "signed with another cluster key" (or
        "unsigned"), so callers can tell strangers from replays.
        """
        sig = message.get("sig")
        if sig is None:
            return "unsigned (the sender runs without a cluster key: --insecure)"
        body = {k: v for k, v in message.items() if k != "sig"}
        if not self.verify_mac(canonical(body), sig):
            return "signed with another cluster key"
        if body.get("address") != source:
            return f"replayed: signed for {body.get('address')}, heard from {source}"
        ts, seq, node_id = body.get("ts"), body.get("seq"), str(body.get("node_id"))
        now = time.time() if now is None else now
        if not isinstance(ts, int | float) or abs(now - ts) > WINDOW_S:
            return "too old (or the clocks disagree)"
        return self.check_seq(node_id, seq)

    def check_seq(self, node_id: str, seq: Any) -> str | None:
        """None (and remembered) when `seq` is newer than any seen from `node_id`."""
        if not isinstance(seq, int) or isinstance(seq, bool):
            return "no sequence number"
        last = self._last_seq.get(node_id, -1)
        if seq == last:
            return "duplicate"  # the same packet heard twice (two interfaces on one network)
        if seq < last:
            return "replayed: not newer than one already heard"
        if len(self._last_seq) > 10_000:
            self._last_seq.clear()
        self._last_seq[node_id] = seq
        return None


def canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def is_handshake_failure(details: str) -> bool:
    """Whether a gRPC error says the TLS handshake failed (the peer holds another key, or none)."""
    text = details.lower()
    return any(s in text for s in ("handshake", "certificate", "ssl", "wrong_version"))
