"""What the HTTP API costs: a streaming client against the same generation called in-process.

    .venv/bin/python bench/bench_api.py                      # dummy engine, 5 ms per token
    .venv/bin/python bench/bench_api.py --engine dummy       # ... waiting on an asyncio timer
    .venv/bin/python bench/bench_api.py --delay-ms 2 --rounds 50 --json
    .venv/bin/python bench/bench_api.py --engine tinygrad --max-tokens 64   # a real model, if installed

One node runs on a background event loop, as under `exo run`. Each round generates the same
greedy answer twice, interleaved so drift hits both alike: once through
`POST /v1/chat/completions` with `stream: true`, read by a blocking HTTP client over a kept-alive
connection, and once with `Generator.prepare` + `Generator.stream` on the node's own loop. The HTTP
client runs in a separate process, as real clients do, so it shares no GIL with the node. For each it
records time to first token (from sending the request, or from calling prepare) and decode
speed (tokens after the first, over the time from the first to the last). Targets: the API
keeps >= 0.95 of the in-process decode speed, and adds < 5 ms to the time to first token.

For scale it also times a bare aiohttp app (on the node's loop) that streams one frame to the
same client: the part of the overhead that is HTTP on this machine, not exo.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from exo_core.api.testing import BackgroundNode, connect
from exo_core.engine import StageInput, StageOutput
from exo_core.engines.dummy import DummyEngine
from exo_core.log import configure_logging
from exo_core.models.shard import Shard
from exo_core.node.generate import TextRequest, Usage
from exo_core.node.sampling import SamplingParams
from exo_core.plugins import registry
from exo_core.runtime import NodeConfig

MESSAGES = [{"role": "user", "content": "Tell me about distributed inference."}]
TARGET_RATIO = 0.95
TARGET_TTFT_MS = 5.0


@dataclass
class Sample:
    ttft_s: float
    decode_s: float  # first token to last
    tokens: int
    text: str

    @property
    def decode_tokens(self) -> int:
        return max(self.tokens - 1, 0)


def via_api(conn: http.client.HTTPConnection, model: str, max_tokens: int | None) -> Sample:
    """One streamed answer over a kept-alive connection (as the openai client's pool does)."""
    body = {
        "model": model,
        "messages": MESSAGES,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens:
        body["max_tokens"] = max_tokens
    start = time.perf_counter()
    conn.request(
        "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"the API answered {response.status}: {response.read().decode()}")
    first = last = None
    tokens = 0
    text = []
    while line := response.readline():
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            now = time.perf_counter()
            if first is None:
                first = now
            last = now
            text.append(choice["delta"].get("content") or "")
    response.read()  # the end of the chunked body, so the connection can be reused
    assert first is not None and last is not None
    return Sample(first - start, last - first, tokens, "".join(text))


class ApiClient:
    """A streaming HTTP client in its own process, as a real client is (no GIL shared with the node)."""

    def __init__(self, url: str, floor_url: str, model: str, max_tokens: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_client_main, args=(url, floor_url, model, max_tokens, child), daemon=True
        )
        self._process.start()

    def run(self, what: str = "api") -> Sample:
        """`api`: one streamed answer; `floor`: one request to the bare aiohttp server."""
        self._pipe.send(what)
        reply = self._pipe.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def close(self) -> None:
        self._pipe.send(None)
        self._process.join(10)


def _client_main(url: str, floor_url: str, model: str, max_tokens: int | None, pipe: Any) -> None:
    conn = connect(url, timeout=300)
    floor_conn = connect(floor_url, timeout=30)
    while (what := pipe.recv()) is not None:
        try:
            pipe.send(via_api(conn, model, max_tokens) if what == "api" else via_floor(floor_conn))
        except BaseException as exc:
            pipe.send(RuntimeError(str(exc)))
    conn.close()
    floor_conn.close()


def via_floor(conn: http.client.HTTPConnection) -> Sample:
    start = time.perf_counter()
    conn.request("POST", "/floor", body=b"{}", headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.readline()
    first = time.perf_counter()
    response.read()
    return Sample(first - start, 0.0, 0, "")


async def start_floor_server() -> tuple[web.AppRunner, str]:
    """A bare aiohttp app on the node's loop that streams one SSE frame: what HTTP alone costs here."""

    async def floor(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/floor", floor)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


class ThreadedDummyEngine(DummyEngine):
    """The dummy engine with its pretend compute on a worker thread, as real engines compute.

    The plain dummy engine waits with `asyncio.sleep`, and the event loop's epoll timeout is
    rounded up to whole milliseconds: when the API does its (overlapped) work for a token
    during that wait, the wait ends up to 1 ms late. A thread that finishes wakes the loop at
    once, as tinygrad's or MLX's would, so this measures the API and not that rounding.
    """

    name = "dummy-threaded"

    async def forward_batch(self, shard: Shard, items: Sequence[StageInput]) -> list[StageOutput]:
        if self.delay_s:
            await asyncio.to_thread(time.sleep, self.delay_s)
        return [self._one(shard, item) for item in items]


async def in_process(node: BackgroundNode, model_id: str, max_tokens: int | None) -> Sample:
    runtime = node.runtime
    assert runtime is not None and runtime.generator is not None
    card = runtime.node.models[model_id]
    request = TextRequest(
        card, messages=MESSAGES, max_tokens=max_tokens, sampling=SamplingParams(temperature=0)
    )
    usage = Usage()
    start = time.perf_counter()
    prepared = runtime.generator.prepare(request)
    first = last = None
    text = []
    async for chunk in runtime.generator.stream(prepared, usage):
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        text.append(chunk.text)
    assert first is not None and last is not None
    return Sample(first - start, last - first, usage.completion_tokens, "".join(text))


def rate(samples: list[Sample]) -> float:
    return sum(s.decode_tokens for s in samples) / sum(s.decode_s for s in samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine",
        default="dummy-threaded",
        help="engine to run: dummy-threaded (default; the dummy engine waiting on a thread), dummy, "
        "or a real one (tinygrad, mlx)",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="dummy engine: pretend compute per token")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=None, help="cap each answer (real engines)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()

    configure_logging("console", "warning")
    registry().engines[ThreadedDummyEngine.name] = ThreadedDummyEngine
    is_dummy = args.engine.startswith("dummy")
    options = {"dummy_delay_ms": args.delay_ms} if is_dummy else {}
    config = NodeConfig(
        model=args.model,
        engine=args.engine,
        engine_options=options,
        api_host="127.0.0.1",
        api_port=0,
        node_host="127.0.0.1",
        discovery="none",
        node_id="bench",
    )
    with BackgroundNode(config) as node:
        floor_runner, floor_url = node.call(start_floor_server())
        client = ApiClient(node.url, floor_url, args.model, args.max_tokens)

        def local_run() -> Sample:
            return node.call(in_process(node, args.model, args.max_tokens), timeout=300)

        for _ in range(args.warmup):
            client.run()
            local_run()
            client.run("floor")
        api: list[Sample] = []
        local: list[Sample] = []
        floor: list[Sample] = []
        for i in range(args.rounds):
            # Alternate which goes first, so neither always follows the other.
            if i % 2:
                local.append(local_run())
                api.append(client.run())
            else:
                api.append(client.run())
                local.append(local_run())
            floor.append(client.run("floor"))
        client.close()
        node.call(floor_runner.cleanup())

    if any(a.text != b.text for a, b in zip(api, local, strict=True)):
        print("warning: the API and in-process answers differ", file=sys.stderr)
    result = {
        "engine": args.engine,
        "model": args.model,
        "delay_ms": args.delay_ms if is_dummy else None,
        "rounds": args.rounds,
        "tokens_per_answer": statistics.median(s.tokens for s in api),
        "api_tokens_per_s": round(rate(api), 2),
        "in_process_tokens_per_s": round(rate(local), 2),
        "ratio": round(rate(api) / rate(local), 4),
        "api_ttft_ms": round(1000 * statistics.median(s.ttft_s for s in api), 3),
        "in_process_ttft_ms": round(1000 * statistics.median(s.ttft_s for s in local), 3),
        # The fastest of each: what the path costs when the machine's scheduler does not interfere.
        "api_ttft_min_ms": round(1000 * min(s.ttft_s for s in api), 3),
        "in_process_ttft_min_ms": round(1000 * min(s.ttft_s for s in local), 3),
    }
    result["ttft_overhead_ms"] = round(result["api_ttft_ms"] - result["in_process_ttft_ms"], 3)
    result["ttft_overhead_min_ms"] = round(result["api_ttft_min_ms"] - result["in_process_ttft_min_ms"], 3)
    # A bare aiohttp request/first-frame round trip from the same client: the machine's HTTP floor.
    result["http_floor_ms"] = round(1000 * statistics.median(s.ttft_s for s in floor), 3)
    result["http_floor_min_ms"] = round(1000 * min(s.ttft_s for s in floor), 3)
    met = result["ratio"] >= TARGET_RATIO and result["ttft_overhead_ms"] < TARGET_TTFT_MS
    result["targets_met"] = met
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"engine {args.engine}, model {args.model}, {args.rounds} rounds of {result['tokens_per_answer']} tokens"
        )
        print(
            f"  decode tokens/s   API {result['api_tokens_per_s']:>9}   in-process {result['in_process_tokens_per_s']:>9}"
        )
        print(f"  ratio             {result['ratio']:.4f}  (target >= {TARGET_RATIO})")
        print(
            f"  TTFT ms (median)  API {result['api_ttft_ms']:>9}   in-process {result['in_process_ttft_ms']:>9}"
        )
        print(
            f"  TTFT ms (min)     API {result['api_ttft_min_ms']:>9}   in-process {result['in_process_ttft_min_ms']:>9}"
        )
        print(
            f"  TTFT overhead     {result['ttft_overhead_ms']} ms median, {result['ttft_overhead_min_ms']} ms min"
            f"  (target < {TARGET_TTFT_MS} ms, on the median)"
        )
        print(
            f"  HTTP floor        {result['http_floor_ms']} ms median, {result['http_floor_min_ms']} ms min"
            "  (a bare aiohttp stream's first frame, same client)"
        )
        print("  targets met" if met else "  TARGET MISSED")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
