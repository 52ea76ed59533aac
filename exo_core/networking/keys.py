"""The cluster key: 32 random bytes kept under EXO_HOME, shared with other machines as a join token.

Every node of a cluster holds the same key. From it each node derives, without talking to
anyone, the cluster's certificate authority (TLS on every peer link) and the key that signs
discovery announcements; a node with another key, or none, cannot join.

A token is `exo1_` + the key in unpadded base64url. An old-style `--cluster-secret` (any other
text) is turned into a key by hashing it, so existing deployments keep working.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_PREFIX = "exo1_"
KEY_BYTES = 32
KEY_FILE = "cluster_key"


class ClusterKeyError(ValueError):
    """A token or key file that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ClusterKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ClusterKeyError(f"a cluster key has {KEY_BYTES} bytes, not {len(self.secret)}")

    def __repr__(self) -> str:  # never the secret itself, in logs or tracebacks
        return f"ClusterKey({self.fingerprint})"

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_token(cls, text: str) -> ClusterKey:
        """A join token (`exo1_...`), or an old `--cluster-secret` string (hashed into a key)."""
        text = text.strip()
        if not text:
            raise ClusterKeyError("the join token is empty; print it on a member with `exo token`")
        if not text.startswith(TOKEN_PREFIX):
            return cls(hashlib.sha256(b"exo-cluster-secret\x00" + text.encode("utf-8")).digest())
        body = text[len(TOKEN_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            raw = b""
        if len(raw) != KEY_BYTES or _b64(raw) != body:
            raise ClusterKeyError(
                "this is not a valid join token (cut short or mistyped?); "
                "print it again on a member of the cluster with `exo token`"
            )
        return cls(raw)

    @property
    def token(self) -> str:
        return TOKEN_PREFIX + _b64(self.secret)

    @property
    def fingerprint(self) -> str:
        """Safe to log and compare: tells keys apart without revealing them."""
        return hashlib.sha256(b"exo-cluster-fingerprint\x00" + self.secret).hexdigest()[:12]

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """An independent subkey for one purpose (HKDF-SHA256)."""
        return HKDF(hashes.SHA256(), length, salt=b"exo-cluster-key-v1", info=purpose.encode()).derive(
            self.secret
        )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def key_path(home: Path) -> Path:
    return home / KEY_FILE


def load(home: Path) -> ClusterKey | None:
    """The key stored under `home`, or None when there is none yet."""
    path = key_path(home)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClusterKeyError(f"cannot read the cluster key {path}: {exc}") from None
    damaged = ClusterKeyError(
        f"{path} is damaged; delete it to start a new cluster, or run with --join TOKEN"
    )
    if not text.strip().startswith(TOKEN_PREFIX):
        raise damaged
    try:
        return ClusterKey.from_token(text)
    except ClusterKeyError:
        raise damaged from None


def save(home: Path, key: ClusterKey) -> Path:
    """Store `key` as this machine's cluster key (readable by its owner only)."""
    path = key_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key.token + "\n")
    os.replace(tmp, path)
    return path


def load_or_create(home: Path) -> tuple[ClusterKey, bool]:
    """This machine's key, created on first use; True when it was just created."""
    existing = load(home)
    if existing is not None:
        return existing, False
    key = ClusterKey.generate()
    save(home, key)
    return key, True
