"""Test kit: real `exo` processes on 127.0.0.1 (or in network namespaces) forming a cluster.

Used by exo-core's cluster tests and bench/bench_cluster.py; plugin authors can run their
engine in a multi-node cluster the same way::

    with Cluster.manual(["a", "b"], engine="dummy", tmp=tmp_path) as cluster:
        text = cluster.chat("a", [{"role": "user", "content": "Hi"}])

Every process is killed (and every namespace removed) when the context exits, even on errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo_core.networking.keys import ClusterKey

EXO = str(Path(sys.executable).with_name("exo"))


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def write_peers_file(path: Path, nodes: Sequence[NodeSpec]) -> Path:
    """A manual-discovery peers file listing `nodes` (in the format existing deployments use)."""
    peers = {
        n.node_id: {
            "address": n.host,
            "port": n.node_port,
            "device_capabilities": {
                "model": "test",
                "chip": "test",
                "memory": n.memory,
                "flops": {"fp32": 1.0, "fp16": 2.0, "int8": 4.0},
            },
        }
        for n in nodes
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"peers": peers}, indent=2), encoding="utf-8")
    os.replace(tmp, path)  # atomic, so a node never reads half a file
    return path


@dataclass
class NodeSpec:
    node_id: str
    node_port: int
    api_port: int
    memory: int = 1000
    host: str = "127.0.0.1"
    netns: str | None = None


@dataclass
class ExoProcess:
    """One `exo run` process."""

    spec: NodeSpec
    args: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.api_port}"

    def start(self) -> None:
        cmd = [EXO, "run", *self.args]
        if self.spec.netns:
            cmd = ["ip", "netns", "exec", self.spec.netns, *cmd]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.kill(signal.SIGTERM)
        if self.proc.poll() is None:
            self.kill(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


@dataclass
class Cluster:
    """Processes of one test cluster, by node id."""

    nodes: dict[str, ExoProcess] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    specs: dict[str, NodeSpec] = field(default_factory=dict)
    peers_file: Path | None = None
    # The join token every node gets (through EXO_CLUSTER_TOKEN, never on the command line,
    # so it is not in `ps`); a node's `env` may give another, or "" for a key of its own.
    token: str = field(default_factory=lambda: ClusterKey.generate().token)

    def list_peers(self, node_ids: Sequence[str]) -> None:
        """Rewrite the shared peers file to list exactly these nodes (nodes re-read it)."""
        assert self.peers_file is not None
        write_peers_file(self.peers_file, [self.specs[n] for n in node_ids])

    def wait_members(self, node_id: str, members: set[str], timeout: float = 60.0) -> None:
        """Until `node_id`'s /v1/topology shows exactly these nodes."""
        deadline = time.monotonic() + timeout
        while True:
            status, topo = self.get(node_id, "/v1/topology")
            if status == 200 and {n["node_id"] for n in topo["nodes"]} == members:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node_id} sees {topo}, wanted {sorted(members)}")
            time.sleep(0.2)

    @classmethod
    @contextlib.contextmanager
    def manual(
        cls,
        node_ids: Sequence[str],
        *,
        tmp: Path,
        engine: str = "dummy",
        memory: Sequence[int] | None = None,
        extra_args: Sequence[str] = (),
        per_node_args: dict[str, Sequence[str]] | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        timeout: float = 120.0,
        listed: Sequence[str] | None = None,
    ) -> Iterator[Cluster]:
        """Nodes that find each other through one shared manual peers file.

        `listed` limits the file to some nodes at first (the others wait); `cluster.list_peers()`
        rewrites it later. Nodes wait for every listed peer before serving.
        """
        tmp.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * len(node_ids))
        specs = [
            NodeSpec(nid, ports[2 * i], ports[2 * i + 1], memory=(memory[i] if memory else 1000))
            for i, nid in enumerate(node_ids)
        ]
        peers_file = tmp / "peers.json"
        cluster = cls(specs={s.node_id: s for s in specs}, peers_file=peers_file)
        cluster.list_peers(listed or node_ids)
        wanted = len(listed or node_ids) - 1
        try:
            for spec in specs:
                args = [
                    "--engine",
                    engine,
                    "--node-id",
                    spec.node_id,
                    "--node-host",
                    spec.host,
                    "--node-port",
                    str(spec.node_port),
                    "--api-host",
                    spec.host,
                    "--api-port",
                    str(spec.api_port),
                    "--discovery-module",
                    "manual",
                    "--discovery-config-path",
                    str(peers_file),
                    "--wait-for-peers",
                    str(wanted if spec.node_id in (listed or node_ids) else 0),
                    *extra_args,
                    *((per_node_args or {}).get(spec.node_id, ())),
                ]
                cluster.add(spec, args, tmp, env)
            if wait:
                cluster.wait_ready(timeout)
            yield cluster
        finally:
            cluster.close()

    def add(
        self, spec: NodeSpec, args: Sequence[str], tmp: Path, env: dict[str, str] | None = None
    ) -> ExoProcess:
        home = tmp / f"home-{spec.node_id}"
        home.mkdir(parents=True, exist_ok=True)
        proc_env = {
            k: v for k, v in os.environ.items() if k not in ("EXO_CLUSTER_SECRET", "EXO_CLUSTER_TOKEN")
        }
        proc_env.update(EXO_HOME=str(home), EXO_LOG_LEVEL="info", EXO_CLUSTER_TOKEN=self.token)
        proc_env.update(env or {})
        process = ExoProcess(spec, list(args), tmp / f"{spec.node_id}.log", proc_env)
        self.nodes[spec.node_id] = process
        process.start()
        return process

    def wait_ready(self, timeout: float = 120.0, node_ids: Sequence[str] | None = None) -> None:
        """Until every node's API answers /healthcheck (it starts after --wait-for-peers is met)."""
        deadline = time.monotonic() + timeout
        for node_id in node_ids or list(self.nodes):
            process = self.nodes[node_id]
            while True:
                if not process.alive():
                    raise RuntimeError(f"node {node_id} exited:\n{process.log()[-4000:]}")
                try:
                    status, _ = self.get(node_id, "/healthcheck", timeout=2)
                    if status == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"node {node_id} not ready after {timeout} s:\n{process.log()[-4000:]}"
                    )
                time.sleep(0.2)

    # ---- HTTP -------------------------------------------------------------------------------

    def _open(self, node_id: str, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        process = self.nodes[node_id]
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            process.url + path, data=data, headers={"content-type": "application/json"} if data else {}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        return opener.open(req, timeout=timeout)

    def _in_netns(
        self, node_id: str, path: str, body: dict[str, Any] | None, timeout: float
    ) -> tuple[int, Any]:
        """An HTTP request made from inside the node's network namespace (by a child process)."""
        process = self.nodes[node_id]
        code = (
            "import json,sys,urllib.request,urllib.error\n"
            "url,body,timeout=sys.argv[1],sys.argv[2],float(sys.argv[3])\n"
            "data=body.encode() if body else None\n"
            "req=urllib.request.Request(url,data=data,headers={'content-type':'application/json'} if data else {})\n"
            "op=urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            "try:\n r=op.open(req,timeout=timeout); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n"
        )
        cmd = ["ip", "netns", "exec", str(process.spec.netns), sys.executable, "-c", code]
        cmd += [process.url + path, json.dumps(body) if body is not None else "", str(timeout)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10, check=False)
        if out.returncode != 0:
            raise OSError(f"HTTP in namespace {process.spec.netns} failed: {out.stderr.strip()[-500:]}")
        status, _, text = out.stdout.partition("\n")
        return int(status), json.loads(text or "null")

    def get(self, node_id: str, path: str, timeout: float = 10) -> tuple[int, Any]:
        if self.nodes[node_id].spec.netns:
            return self._in_netns(node_id, path, None, timeout)
        try:
            with self._open(node_id, path, None, timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def post(self, node_id: str, path: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, Any]:
        if self.nodes[node_id].spec.netns:
            return self._in_netns(node_id, path, body, timeout)
        try:
            with self._open(node_id, path, body, timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def chat(
        self,
        node_id: str,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        model: str = "smollm2-135m",
        timeout: float = 300,
    ) -> str:
        """A greedy chat completion's text (raises on an error response)."""
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        status, reply = self.post(node_id, "/v1/chat/completions", body, timeout)
        if status != 200:
            raise RuntimeError(f"chat on {node_id}: HTTP {status}: {reply}")
        return reply["choices"][0]["message"]["content"]

    def stream_chat(
        self,
        node_id: str,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        model: str = "smollm2-135m",
        timeout: float = 300,
    ) -> Iterator[tuple[float, dict[str, Any]]]:
        """(arrival time, SSE event) for each event of a greedy streamed chat completion."""
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0, "stream": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        with self._open(node_id, "/v1/chat/completions", body, timeout) as resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return
                yield time.monotonic(), json.loads(payload)

    def close(self) -> None:
        for process in self.nodes.values():
            process.stop()
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def logs(self) -> str:
        return "\n".join(f"===== {nid} =====\n{p.log()[-3000:]}" for nid, p in self.nodes.items())


def stream_text(events: Sequence[dict[str, Any]]) -> str:
    return "".join(
        (choice.get("delta") or {}).get("content") or ""
        for event in events
        for choice in event.get("choices", [])
    )
