"""The cluster secret: HMAC proofs on every RPC and signatures on discovery announcements.

A call carries `x-exo-auth: <unix ms>.<nonce>.<hmac>` where the HMAC-SHA256, keyed by the
secret, covers the timestamp, the nonce and the RPC method. The server refuses a call whose
proof is missing, wrong, older than `WINDOW_S`, or a nonce it has already seen in that window.
UDP announcements carry a `sig` over their canonical JSON and a timestamp checked the same way.

The secret proves membership; it does not encrypt traffic. Across networks you do not trust,
run the cluster over a VPN.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

log = structlog.get_logger("exo.auth")

AUTH_HEADER = "x-exo-auth"
NODE_HEADER = "x-exo-node"
WINDOW_S = 120.0


def _key(secret: str) -> bytes:
    return hashlib.sha256(b"exo-cluster-secret\x00" + secret.encode("utf-8")).digest()


class ClusterAuth:
    """Signs outgoing calls and checks incoming ones for one cluster secret."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("an empty cluster secret authenticates nothing")
        self._key = _key(secret)
        self._seen: dict[int, set[str]] = {}  # time bucket -> nonces seen

    # ---- RPCs --------------------------------------------------------------------------------

    def proof(self, method: str, now: float | None = None) -> str:
        ts = int((time.time() if now is None else now) * 1000)
        nonce = secrets.token_hex(8)
        return f"{ts}.{nonce}.{self._mac(f'{ts}.{nonce}.{method}')}"

    def check(self, value: str | None, method: str, now: float | None = None) -> str | None:
        """None when the proof is good, else why it is refused."""
        if not value:
            return "no cluster secret proof (this cluster needs --cluster-secret)"
        try:
            ts_text, nonce, mac = value.split(".")
            ts = int(ts_text)
        except ValueError:
            return "malformed cluster secret proof"
        if not hmac.compare_digest(mac, self._mac(f"{ts}.{nonce}.{method}")):
            return "wrong cluster secret"
        now = time.time() if now is None else now
        skew = abs(now - ts / 1000)
        if skew > WINDOW_S:
            return f"cluster secret proof is {skew:.0f} s off this node's clock (check the clocks)"
        return None if self._first_use(nonce, now) else "replayed cluster secret proof"

    def _first_use(self, nonce: str, now: float) -> bool:
        bucket = int(now // WINDOW_S)
        for old in [b for b in self._seen if b < bucket - 2]:
            del self._seen[old]
        if any(nonce in seen for seen in self._seen.values()):
            return False
        self._seen.setdefault(bucket, set()).add(nonce)
        return True

    def metadata(self, method: str, node_id: str) -> tuple[tuple[str, str], ...]:
        return ((AUTH_HEADER, self.proof(method)), (NODE_HEADER, node_id))

    # ---- announcements -----------------------------------------------------------------------

    def sign_announcement(self, message: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in message.items() if k != "sig"}
        body.setdefault("ts", time.time())
        return {**body, "sig": self._mac(_canonical(body))}

    def check_announcement(self, message: dict[str, Any], now: float | None = None) -> str | None:
        sig = message.get("sig")
        if not isinstance(sig, str):
            return "unsigned announcement (this cluster needs --cluster-secret)"
        body = {k: v for k, v in message.items() if k != "sig"}
        if not hmac.compare_digest(sig, self._mac(_canonical(body))):
            return "announcement signed with a different cluster secret"
        ts = body.get("ts")
        now = time.time() if now is None else now
        if not isinstance(ts, int | float) or abs(now - ts) > WINDOW_S:
            return "announcement too old (or the clocks disagree)"
        return None

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC without a valid proof of the cluster secret (and logs who tried)."""

    def __init__(self, auth: ClusterAuth) -> None:
        self._auth = auth
        self._last_log: dict[str, float] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(handler_call_details.invocation_metadata or ())  # type: ignore[attr-defined]
        method = handler_call_details.method  # type: ignore[attr-defined]
        reason = self._auth.check(metadata.get(AUTH_HEADER), method)
        if reason is None:
            return await continuation(handler_call_details)
        claimed = metadata.get(NODE_HEADER, "?")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._log_refusal(context.peer(), claimed, method, reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"refused: {reason}")

        return grpc.unary_unary_rpc_method_handler(refuse)

    def _log_refusal(self, peer: str, claimed: str, method: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(claimed, -1e9) < 60:
            return  # one line per claimed node a minute
        if len(self._last_log) > 1000:
            self._last_log.clear()
        self._last_log[claimed] = now
        log.warning("refused peer RPC", peer=peer, claimed_node=claimed, method=method, reason=reason)
