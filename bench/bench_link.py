"""Link transport benchmark: one message and its acknowledgement between two processes, over
the link's own TLS socket (`LinkServer`) and over the gRPC `NodeLink` stream it falls back to.

    .venv/bin/python bench/bench_link.py                 # quiet machine
    .venv/bin/python bench/bench_link.py --busy 3        # with 3 busy-looping processes beside it

Both ends run on uvloop with the cluster's mutual TLS, as `exo run` does. The server process
answers health checks (the cheapest acknowledged message); the client sends `--messages` of
them one after another and times each round trip. The first 10% are a warm-up. The ratio is
socket / gRPC of the same run (the machine is shared and noisy).

A second table times what every hop also pays, whatever the transport: an engine thread
handing its result to the event loop (`call_soon_threadsafe`), once right after the loop last
ran (baseline) and once after the loop sat idle for 10 ms, as a stage's loop does while
another stage computes.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import threading
import time
from typing import Any

import grpc
import uvloop

from exo_core.networking.auth import ClusterAuth
from exo_core.networking.generated import link_pb2_grpc as lpb_grpc
from exo_core.networking.generated import node_service_pb2 as pb
from exo_core.networking.keys import ClusterKey
from exo_core.networking.link import LinkSender, LinkServer, LinkServicer
from exo_core.node.messages import RequestState

KEY = ClusterKey(b"b" * 32)


class _Node:
    """What the link's receiving end asks of a node for a health check."""

    node_id = "bench"

    def request_state(self, request_id: str, attempt: int) -> RequestState:
        return RequestState.UNKNOWN


def _serve(ports: Any) -> None:
    async def main() -> None:
        auth = ClusterAuth(KEY, "server")
        node: Any = _Node()
        server = grpc.aio.server()
        lpb_grpc.add_NodeLinkServicer_to_server(LinkServicer(node), server)
        grpc_port = server.add_secure_port("127.0.0.1:0", auth.server_credentials())
        await server.start()
        link = LinkServer(node, auth.ssl_context(server=True))
        ports.put((grpc_port, await link.start("127.0.0.1", 0)))
        await asyncio.sleep(3600)

    uvloop.run(main())


def _busy() -> None:
    while True:
        pass


async def _round_trips(grpc_port: int, link_port: int, socket: bool, messages: int) -> list[float]:
    auth = ClusterAuth(KEY, "client")
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{grpc_port}", auth.channel_credentials(), options=auth.channel_options
    )

    async def port() -> int:
        return link_port

    sender = LinkSender(
        channel,
        "bench",
        host="127.0.0.1" if socket else None,
        port_source=port,
        tls=auth.ssl_context(server=False),
    )
    times = []
    try:
        for _ in range(messages):
            start = time.perf_counter()
            await sender.send("health", pb.HealthRequest(), 10)
            times.append(time.perf_counter() - start)
        assert sender.transport == ("socket" if socket else "grpc"), sender.transport
    finally:
        await sender.close()
        await channel.close()
    return times[messages // 10 :]


async def _wake_ups(idle_s: float, count: int) -> list[float]:
    """Seconds from a thread's `call_soon_threadsafe` to the loop running the callback."""
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(count):
        done: asyncio.Future[float] = loop.create_future()

        def work(done: asyncio.Future[float]) -> None:
            time.sleep(idle_s)
            loop.call_soon_threadsafe(done.set_result, time.perf_counter())

        threading.Thread(target=work, args=(done,)).start()
        sent = await done
        times.append(time.perf_counter() - sent)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000, help="round trips per transport")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes beside the benchmark")
    parser.add_argument("--passes", type=int, default=2, help="alternating passes per transport")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(ports,), daemon=True)
    server.start()
    busy = [ctx.Process(target=_busy, daemon=True) for _ in range(args.busy)]
    try:
        grpc_port, link_port = ports.get(timeout=60)
        for p in busy:
            p.start()
        results: dict[str, list[float]] = {"grpc": [], "socket": []}
        for _ in range(args.passes):
            for name in ("grpc", "socket"):
                results[name] += uvloop.run(
                    _round_trips(grpc_port, link_port, name == "socket", args.messages)
                )
    finally:
        for p in [server, *busy]:
            p.kill()
    print(f"{args.messages} x {args.passes} round trips each, {args.busy} busy process(es) beside")
    print("| transport | median | p90 | p99 |")
    print("|---|---|---|---|")
    row = {}
    for name in ("grpc", "socket"):
        ts = sorted(results[name])
        row[name] = (statistics.median(ts), ts[int(len(ts) * 0.9)], ts[int(len(ts) * 0.99)])
        label = "gRPC NodeLink stream (baseline)" if name == "grpc" else "link socket"
        print(f"| {label} | " + " | ".join(f"{v * 1e6:.0f} us" for v in row[name]) + " |")
    ratios = [s / g for s, g in zip(row["socket"], row["grpc"], strict=True)]
    print("| socket / gRPC | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")

    print()
    print("| thread -> event loop wake-up | median | p90 | p99 |")
    print("|---|---|---|---|")
    wake = {}
    for idle_s, label in ((0.0, "loop just ran (baseline)"), (0.010, "loop idle for 10 ms")):
        ts = sorted(uvloop.run(_wake_ups(idle_s, 300)))
        wake[idle_s] = (statistics.median(ts), ts[int(len(ts) * 0.9)], ts[int(len(ts) * 0.99)])
        print(f"| {label} | " + " | ".join(f"{v * 1e6:.0f} us" for v in wake[idle_s]) + " |")
    ratios = [i / b for i, b in zip(wake[0.010], wake[0.0], strict=True)]
    print("| idle / baseline | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
