"""What exo adds on top of an RKLLAMA board, and what several boards give together.

    .venv/bin/python bench/bench_rkllm.py                      # both dialects, 16 tok/s, 200 ms
    .venv/bin/python bench/bench_rkllm.py --rounds 5 --json
    .venv/bin/python bench/bench_rkllm.py --skip-cluster       # part 1 only (no exo processes)

Everything runs against the stand-in RKLLAMA server (`exo_rkllm.fake_server`), each in its
own process like a board's server, at `--tokens-per-second` (16) and `--first-token-ms` (200).

1. Overhead, same run, per dialect: one `exo run --engine rkllm` process in front of the
   server. Each round streams the same answer directly from the server (the bridge's own HTTP
   client, timed as fragments arrive) and through exo's OpenAI API (`stream: true`, timed as
   SSE deltas arrive), interleaved so drift hits both alike. Time to first token is measured
   from sending the request; decode speed is the server's tokens after the first over the
   time from the first to the last. Targets: at most 20 ms added to the first token, at least
   0.98 of the direct decode speed.
2. Scale-out: 6 concurrent streamed requests sent to one node of a cluster of 1, then of 3,
   rkllm nodes (`exo run` processes, manual discovery), each node with its own server.
   Aggregate speed = all answers' server tokens over the wall time. Target: 3 nodes >= 2.7x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from exo_rkllm.fake_server import answer_pieces, fake_answer, in_subprocess

from exo_core.testing.cluster import Cluster

MODEL = "smollm2-135m"
FOLDER = "SmolLM2-135M-Instruct"
TARGET_TTFT_MS = 20.0
TARGET_RATIO = 0.98
TARGET_SCALE = 2.7


@dataclass
class Sample:
    ttft_s: float
    decode_s: float  # first fragment to last
    pieces: int  # the server's tokens in the answer

    @property
    def tok_s(self) -> float:
        return (self.pieces - 1) / self.decode_s if self.decode_s > 0 else 0.0


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Benchmark question {i}: what does an NPU do?"}]


# ---- part 1: direct vs through exo ----------------------------------------------------------------


async def direct(
    http: aiohttp.ClientSession, url: str, dialect: str, question: list[dict[str, str]]
) -> Sample:
    """One streamed answer straight from the server (model already loaded): a raw POST, timed at
    the first and the last bytes of the body — the strictest baseline, nothing parsed."""
    if dialect == "fork":
        path, body = "/generate", {"messages": question, "stream": True}
    else:
        path, body = "/api/chat", {"model": FOLDER, "messages": question, "stream": True}
    arrivals = []
    started = time.perf_counter()
    async with http.post(url + path, json=body) as resp:
        async for _ in resp.content.iter_any():
            arrivals.append(time.perf_counter())
    pieces = len(answer_pieces(fake_answer(question)))
    return Sample(arrivals[0] - started, arrivals[-1] - arrivals[0], pieces)


async def through_exo(
    api_url: str, question: list[dict[str, str]], http: aiohttp.ClientSession | None = None
) -> tuple[Sample, str]:
    """One streamed chat completion from exo's API, timed as SSE deltas arrive (same HTTP
    library as the direct path, so the comparison is of exo, not of clients)."""
    body = {"model": MODEL, "messages": question, "temperature": 0, "stream": True}
    arrivals, text = [], []
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(aiohttp.ClientSession())
        started = time.perf_counter()
        async with http.post(api_url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"exo answered HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                payload = line.decode("utf-8").strip().removeprefix("data:").strip()
                if not payload or payload == "[DONE]":
                    continue
                event = json.loads(payload)
                if "error" in event:
                    raise RuntimeError(f"exo answered with an error: {event['error']}")
                for choice in event.get("choices", []):
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        arrivals.append(time.perf_counter())
                        text.append(content)
    pieces = len(answer_pieces(fake_answer(question)))
    return Sample(arrivals[0] - started, arrivals[-1] - arrivals[0], pieces), "".join(text)


async def _overhead_rounds(url: str, api: str, dialect: str, rounds: int) -> list[tuple[Sample, Sample]]:
    async with aiohttp.ClientSession() as http:
        await through_exo(api, messages(-1), http)  # warm up: model load, tokenizer, connections
        await direct(http, url, dialect, messages(-2))
        pairs = []
        for i in range(rounds):
            d = await direct(http, url, dialect, messages(i))
            e, text = await through_exo(api, messages(i), http)
            if text != fake_answer(messages(i)):
                raise RuntimeError(f"exo's answer differs from the server's: {text!r}")
            pairs.append((d, e))
        return pairs


def overhead(dialect: str, args: argparse.Namespace, tmp: Path) -> dict:
    server_args = _server_args(dialect, args)
    with (
        in_subprocess(*server_args) as url,
        _cluster(["solo"], [url], tmp / f"overhead-{dialect}") as cluster,
    ):
        pairs = asyncio.run(_overhead_rounds(url, cluster.nodes["solo"].url, dialect, args.rounds))
    ttft_d = statistics.median(d.ttft_s for d, _ in pairs) * 1000
    ttft_e = statistics.median(e.ttft_s for _, e in pairs) * 1000
    rate_d = statistics.median(d.tok_s for d, _ in pairs)
    rate_e = statistics.median(e.tok_s for _, e in pairs)
    return {
        "dialect": dialect,
        "rounds": args.rounds,
        "tokens_per_answer": pairs[0][0].pieces,
        "ttft_direct_ms": round(ttft_d, 1),
        "ttft_exo_ms": round(ttft_e, 1),
        "ttft_added_ms": round(ttft_e - ttft_d, 1),
        "tok_s_direct": round(rate_d, 2),
        "tok_s_exo": round(rate_e, 2),
        "throughput_ratio": round(rate_e / rate_d, 3),
        "ok": ttft_e - ttft_d <= TARGET_TTFT_MS and rate_e / rate_d >= TARGET_RATIO,
        "samples": [{"direct": asdict(d), "exo": asdict(e)} for d, e in pairs],
    }


# ---- part 2: one node vs three ---------------------------------------------------------------------


def aggregate(n_nodes: int, dialect: str, args: argparse.Namespace, tmp: Path) -> dict:
    nodes = [f"n{i}" for i in range(n_nodes)]
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(in_subprocess(*_server_args(dialect, args))) for _ in nodes]
        cluster = stack.enter_context(_cluster(nodes, urls, tmp / f"scale-{n_nodes}"))
        for node, _ in zip(nodes, urls, strict=True):  # warm each board up (model load, tokenizer)
            cluster.chat(node, messages(-1), max_tokens=2)
        questions = [messages(100 + i) for i in range(args.concurrent)]
        api = cluster.nodes[nodes[0]].url

        async def all_at_once() -> list[tuple[Sample, str]]:
            return list(await asyncio.gather(*(through_exo(api, q) for q in questions)))

        started = time.perf_counter()
        results = asyncio.run(all_at_once())
        wall = time.perf_counter() - started
    for question, (_, text) in zip(questions, results, strict=True):
        if text != fake_answer(question):
            raise RuntimeError(f"a concurrent answer differs from the server's: {text!r}")
    tokens = sum(sample.pieces for sample, _ in results)
    return {
        "nodes": n_nodes,
        "requests": len(questions),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_s": round(tokens / wall, 2),
    }


# ---- plumbing --------------------------------------------------------------------------------------


def _server_args(dialect: str, args: argparse.Namespace) -> list[str]:
    return [
        "--dialect", dialect,
        "--tokens-per-second", str(args.tokens_per_second),
        "--first-token-ms", str(args.first_token_ms),
        "--answer-repeat", str(args.answer_repeat),
    ]  # fmt: skip


@contextlib.contextmanager
def _cluster(nodes: list[str], urls: list[str], tmp: Path) -> Iterator[Cluster]:
    per_node: dict[str, Sequence[str]] = {n: ("--rkllm-server", u) for n, u in zip(nodes, urls, strict=True)}
    with Cluster.manual(nodes, tmp=tmp, engine="rkllm", per_node_args=per_node) as cluster:
        yield cluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dialects", default="fork,upstream", help="for part 1 (part 2 uses the first)")
    p.add_argument("--tokens-per-second", type=float, default=16.0)
    p.add_argument("--first-token-ms", type=float, default=200.0)
    p.add_argument("--answer-repeat", type=int, default=1, help="longer answers (about 35 tokens each)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrent", type=int, default=6)
    p.add_argument("--skip-cluster", action="store_true", help="only part 1")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    dialects = [d.strip() for d in args.dialects.split(",") if d.strip()]
    report: dict = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
    with tempfile.TemporaryDirectory(prefix="bench-rkllm-") as tmp_dir:
        tmp = Path(tmp_dir)
        report["overhead"] = [overhead(d, args, tmp) for d in dialects]
        if not args.skip_cluster:
            one = aggregate(1, dialects[0], args, tmp)
            three = aggregate(3, dialects[0], args, tmp)
            speedup = three["tok_s"] / one["tok_s"]
            report["scale_out"] = {"one": one, "three": three, "speedup": round(speedup, 2),
                                   "ok": speedup >= TARGET_SCALE}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    ok = all(o["ok"] for o in report["overhead"]) and report.get("scale_out", {"ok": True})["ok"]
    return 0 if ok else 1


def _print(report: dict) -> None:
    s = report["settings"]
    print(f"stand-in RKLLAMA at {s['tokens_per_second']} tok/s, first token {s['first_token_ms']} ms")
    print(f"{'dialect':9} {'TTFT direct':>12} {'TTFT exo':>10} {'added':>8} {'tok/s direct':>13} "
          f"{'tok/s exo':>10} {'ratio':>7}")  # fmt: skip
    for o in report["overhead"]:
        print(
            f"{o['dialect']:9} {o['ttft_direct_ms']:>10.1f}ms {o['ttft_exo_ms']:>8.1f}ms "
            f"{o['ttft_added_ms']:>6.1f}ms {o['tok_s_direct']:>13.2f} {o['tok_s_exo']:>10.2f} "
            f"{o['throughput_ratio']:>7.3f}  {'ok' if o['ok'] else 'MISSED'}"
        )
    print(f"targets: <= {TARGET_TTFT_MS:.0f} ms added, >= {TARGET_RATIO} of direct tok/s")
    if "scale_out" in report:
        so = report["scale_out"]
        for key in ("one", "three"):
            r = so[key]
            print(f"{r['nodes']} node(s): {r['requests']} concurrent requests, {r['tokens']} tokens "
                  f"in {r['wall_s']} s = {r['tok_s']} tok/s")  # fmt: skip
        print(
            f"speedup 3 vs 1: {so['speedup']}x (target >= {TARGET_SCALE}x)  {'ok' if so['ok'] else 'MISSED'}"
        )


if __name__ == "__main__":
    sys.exit(main())
