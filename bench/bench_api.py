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

Two more scenarios, on the embedded model (tinygrad by default):

    .venv/bin/python bench/bench_api.py --scenario prefix-cache   # 10th turn's TTFT, cache on / off
    .venv/bin/python bench/bench_api.py --scenario grammar        # a JSON schema's cost per token

`prefix-cache` runs a ten-turn greedy chat through the streaming API twice per round, once with
the prefix cache and once without (the same prompts: greedy answers are the same), and reports
the tenth turn's time to first token of each (target: cached <= 0.3x uncached). `grammar` asks
for JSON valid against a schema and times the grammar's work per token (llguidance's mask and
commit, on the answer's own tokens) against the decode time per token (target < 10%), and the
decode speed with and without the schema.
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
    if "--scenario" in sys.argv:
        return scenario_main()
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


# ---- the prefix cache and the grammar ----------------------------------------------------------

TURNS = [
    "What is the capital of France? Answer in one word.",
    "Tell me one thing tourists like to see there.",
    "And what is the capital of Italy?",
    "Name a famous dish from that country.",
    "How is it usually made?",
    "Which of the two cities is older?",
    "Give me a short travel tip for visiting both.",
    "What language do they speak in the second one?",
    "How do you say thank you in it?",
    "Summarise our conversation in one sentence.",
]
TARGET_PREFIX_RATIO = 0.3
TARGET_GRAMMAR_SHARE = 0.10
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 4},
    },
    "required": ["city", "country", "population_millions", "landmarks"],
    "additionalProperties": False,
}


def stream_chat(url: str, model: str, messages: list[dict[str, Any]], max_tokens: int, **extra: Any):
    """(time to first token, answer, usage) of one streamed chat completion."""
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    conn = connect(url, timeout=600)
    try:
        start = time.perf_counter()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        first, text, usage, last = None, [], {}, start
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            frame = json.loads(line[6:])
            if frame.get("usage"):
                usage = frame["usage"]
            for choice in frame.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                    text.append(piece)
        assert first is not None, "no answer"
        return first - start, "".join(text), usage, last - first
    finally:
        conn.close()


def conversation(url: str, model: str, max_tokens: int) -> tuple[list[float], list[str], list[int]]:
    messages: list[dict[str, Any]] = []
    ttfts, answers, cached = [], [], []
    for question in TURNS:
        messages.append({"role": "user", "content": question})
        ttft, text, usage, _ = stream_chat(url, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": text})
        ttfts.append(ttft)
        answers.append(text)
        cached.append(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))
    return ttfts, answers, cached


async def _reset_prefix_cache(node: BackgroundNode, on: bool) -> None:
    from exo_core.node.prefix_cache import DEFAULT_BUDGET_BYTES, PrefixIndex

    assert node.runtime is not None and node.runtime.node is not None
    core = node.runtime.node
    core.origin.prefixes = PrefixIndex()
    await core.stage.kept.clear()
    core.stage.kept.budget_bytes = DEFAULT_BUDGET_BYTES if on else 0


def bench_prefix_cache(node: BackgroundNode, args: argparse.Namespace) -> dict[str, Any]:
    conversation(node.url, args.model, args.max_tokens)  # warm: graphs captured, tokenizer loaded
    on_ttft, off_ttft, same = [], [], True
    cached_tokens: list[int] = []
    prompt_tokens = 0
    for _ in range(args.rounds):
        node.call(_reset_prefix_cache(node, on=True))
        ttfts, answers, cached = conversation(node.url, args.model, args.max_tokens)
        on_ttft.append(ttfts[-1])
        cached_tokens = cached
        node.call(_reset_prefix_cache(node, on=False))
        ttfts_off, answers_off, _ = conversation(node.url, args.model, args.max_tokens)
        off_ttft.append(ttfts_off[-1])
        same = same and answers == answers_off
        messages = [
            m
            for q, a in zip(TURNS, answers, strict=True)
            for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
        ][:-1]
        prompt_tokens = stream_chat(node.url, args.model, messages, 1)[2]["prompt_tokens"]
    node.call(_reset_prefix_cache(node, on=True))
    ratio = statistics.median(on_ttft) / statistics.median(off_ttft)
    return {
        "scenario": "prefix-cache",
        "engine": args.engine,
        "model": args.model,
        "rounds": args.rounds,
        "turn10_prompt_tokens": prompt_tokens,
        "turn10_cached_tokens": cached_tokens[-1],
        "cached_tokens_per_turn": cached_tokens,
        "turn10_ttft_ms_cached": round(1000 * statistics.median(on_ttft), 1),
        "turn10_ttft_ms_uncached": round(1000 * statistics.median(off_ttft), 1),
        "ratio": round(ratio, 3),
        "same_answers": same,
        "targets_met": ratio <= TARGET_PREFIX_RATIO and same,
    }


def bench_grammar(node: BackgroundNode, args: argparse.Namespace) -> dict[str, Any]:
    from exo_core.models.tokenizer import load_tokenizer
    from exo_core.node.constraints import Constraint, json_schema_grammar, ll_tokenizer

    assert node.runtime is not None
    card = node.runtime.registry.models[args.model]
    tokenizer = load_tokenizer(card)
    ll_tokenizer(tokenizer)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    ask = [{"role": "user", "content": "Describe Paris as JSON."}]
    stream_chat(node.url, args.model, ask, args.max_tokens, response_format=fmt)  # warm
    stream_chat(node.url, args.model, ask, args.max_tokens)
    constrained, free, grammar_s, tokens = [], [], [], 0
    answer = ""
    for _ in range(args.rounds):
        _, answer, usage, decode_s = stream_chat(
            node.url, args.model, ask, args.max_tokens, response_format=fmt
        )
        constrained.append((usage["completion_tokens"], decode_s))
        _, _, usage_free, decode_free = stream_chat(node.url, args.model, ask, args.max_tokens)
        free.append((usage_free["completion_tokens"], decode_free))
        # The grammar's own work for this answer, as the last stage does it: mask, then commit.
        ids = tokenizer.encode(answer)
        start = time.perf_counter()
        constraint = Constraint(json_schema_grammar(SCHEMA), tokenizer)
        build = time.perf_counter() - start
        start = time.perf_counter()
        for token in ids:
            constraint.allowed()
            constraint.consume(token)
        constraint.allowed()  # the last mask: only end of turn
        grammar_s.append(((time.perf_counter() - start) / (len(ids) + 1), build))
        tokens = len(ids)
    json.loads(answer)  # the answer is JSON (the API test checks it against the schema)
    per_token = statistics.median(g for g, _ in grammar_s)
    decode = statistics.median(s / max(n - 1, 1) for n, s in constrained)
    decode_free = statistics.median(s / max(n - 1, 1) for n, s in free)
    return {
        "scenario": "grammar",
        "engine": args.engine,
        "model": args.model,
        "rounds": args.rounds,
        "answer_tokens": tokens,
        "grammar_ms_per_token": round(1000 * per_token, 3),
        "grammar_build_ms": round(1000 * statistics.median(b for _, b in grammar_s), 3),
        "decode_ms_per_token_with_schema": round(1000 * decode, 3),
        "decode_ms_per_token_without": round(1000 * decode_free, 3),
        "grammar_share_of_decode": round(per_token / decode, 4),
        "targets_met": per_token / decode < TARGET_GRAMMAR_SHARE,
    }


def scenario_main() -> int:
    parser = argparse.ArgumentParser(description="bench_api scenarios: prefix-cache, grammar")
    parser.add_argument("--scenario", choices=["prefix-cache", "grammar"], required=True)
    parser.add_argument("--engine", default="tinygrad")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="default: 32 (prefix-cache), 160 (grammar)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    if args.max_tokens is None:
        args.max_tokens = 32 if args.scenario == "prefix-cache" else 160
    configure_logging("console", "warning")
    config = NodeConfig(
        model=args.model,
        engine=args.engine,
        api_host="127.0.0.1",
        api_port=0,
        node_host="127.0.0.1",
        discovery="none",
        node_id="bench",
    )
    with BackgroundNode(config, start_timeout=600) as node:
        run = bench_prefix_cache if args.scenario == "prefix-cache" else bench_grammar
        result = run(node, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"  {key:34} {value}")
        print("  targets met" if result["targets_met"] else "  TARGET MISSED")
    return 1 if args.check and not result["targets_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
