"""What exo adds in front of an OpenAI-compatible server, and what balancing two unequal ones gives.

    .venv/bin/python bench/bench_upstream.py                 # ~2 minutes
    .venv/bin/python bench/bench_upstream.py --rounds 6 --seconds 20 --json

The upstreams are real llama.cpp servers (`python -m llama_cpp.server`, llama-cpp-python) serving
the embedded SmolLM2-135M GGUF; exo is an `exo run --engine upstream` process in front of them.
Every request is a greedy streamed chat completion, timed as SSE deltas arrive.

1. Overhead, one upstream (`--threads-fast` threads): each round streams the same answer
   directly from the server and through exo, interleaved so drift hits both alike. First token
   is measured from sending the request; decode speed is deltas after the first over the time
   from the first to the last (llama.cpp sends one token per delta; exo passes them on one by
   one). Targets: at most +20 ms to the first token, at least 0.98 of the direct decode speed.
2. Balancing, two unequal upstreams (one with half the threads): for `--seconds`, `--clients`
   closed-loop clients (each sends its next request when its answer ends) ask exo, which
   fronts both; then each server alone, asked directly by as many clients. Aggregate speed =
   deltas received over the wall time. Target: through exo >= 0.9 of the sum of each alone.
   On a machine with fewer cores than the two servers' threads together the servers slow
   each other down when both run, which the "each alone" runs do not see: the ratio then
   measures the CPU too, not only the balancing; so the bench also drives both servers directly
   at the same time (half the clients each), the speed the machine gives the two together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "exo-upstream" / "tests"))
from upstream_helpers import HAVE_LLAMA, free_port, llama_server  # noqa: E402

MODEL = "smollm2-135m"
TARGET_TTFT_MS = 20.0
TARGET_RATIO = 0.98
TARGET_BALANCE = 0.9
QUESTION = "Write a short paragraph about the sea."
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Sample:
    ttft_s: float
    decode_s: float
    deltas: int

    @property
    def tok_s(self) -> float:
        return (self.deltas - 1) / self.decode_s if self.decode_s > 0 else 0.0


async def stream(session: aiohttp.ClientSession, base: str, max_tokens: int, i: int = 0) -> Sample:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"{QUESTION} ({i})"}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    start = time.perf_counter()
    first = last = None
    deltas = 0
    async with session.post(base + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            obj = json.loads(line[5:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if obj.get("choices") and (obj["choices"][0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                deltas += 1
    assert first is not None and last is not None, "no text"
    return Sample(first - start, last - first, deltas)


@contextlib.contextmanager
def exo_node(tmp: Path, upstreams: Sequence[str]) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "exo_core", "run", "--engine", "upstream", "--api-host", "127.0.0.1",
            "--api-port", str(port), "--discovery-module", "none"]  # fmt: skip
    for url in upstreams:
        args += ["--upstream", url]
    log = tmp / f"exo-{port}.log"
    env = {**os.environ, "EXO_HOME": str(tmp / "exo-home"), "EXO_LOG_LEVEL": "warning", "NO_PROXY": "*"}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            try:
                _NO_PROXY.open(url + "/healthcheck", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def overhead(direct: str, exo: str, rounds: int, max_tokens: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        await stream(session, direct, 8)
        await stream(session, exo, 8)  # warm up both
        d: list[Sample] = []
        e: list[Sample] = []
        for i in range(rounds):
            pair = [(direct, d), (exo, e)] if i % 2 == 0 else [(exo, e), (direct, d)]
            for base, out in pair:
                out.append(await stream(session, base, max_tokens))
    ttft_d = statistics.median(s.ttft_s for s in d) * 1000
    ttft_e = statistics.median(s.ttft_s for s in e) * 1000
    tps_d = statistics.median(s.tok_s for s in d)
    tps_e = statistics.median(s.tok_s for s in e)
    return {
        "ttft_direct_ms": round(ttft_d, 1),
        "ttft_exo_ms": round(ttft_e, 1),
        "ttft_added_ms": round(ttft_e - ttft_d, 1),
        "decode_direct_tok_s": round(tps_d, 1),
        "decode_exo_tok_s": round(tps_e, 1),
        "decode_ratio": round(tps_e / tps_d, 3),
    }


async def aggregate(base: str, clients: int, seconds: float, max_tokens: int) -> float:
    """Deltas per second over `seconds` with `clients` closed-loop clients."""
    deadline = time.perf_counter() + seconds
    total = 0
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(c: int) -> None:
            nonlocal total
            i = 0
            while time.perf_counter() < deadline:
                sample = await stream(session, base, max_tokens, c * 1000 + i)
                total += sample.deltas
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return total / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads-fast", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not HAVE_LLAMA:
        sys.exit("bench_upstream needs llama-cpp-python[server] (scripts/bootstrap.sh installs it)")
    slow_threads = max(1, args.threads_fast // 2)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with (
            llama_server(tmp, threads=args.threads_fast) as fast,
            llama_server(tmp, threads=slow_threads) as slow,
        ):
            with exo_node(tmp, [fast.url]) as exo_one:
                one = asyncio.run(overhead(fast.url, exo_one, args.rounds, args.max_tokens))
            with exo_node(tmp, [fast.url, slow.url]) as exo_two:
                asyncio.run(stream_warm(exo_two))
                before = fast.requests(), slow.requests()
                through = asyncio.run(aggregate(exo_two, args.clients, args.seconds, args.max_tokens))
                split = fast.requests() - before[0], slow.requests() - before[1]
            alone_fast = asyncio.run(aggregate(fast.url, args.clients, args.seconds, args.max_tokens))
            alone_slow = asyncio.run(aggregate(slow.url, args.clients, args.seconds, args.max_tokens))
            both_direct = asyncio.run(
                both_at_once(fast.url, slow.url, args.clients, args.seconds, args.max_tokens)
            )
    two = {
        "threads": [args.threads_fast, slow_threads],
        "clients": args.clients,
        "exo_both_tok_s": round(through, 1),
        "exo_requests_fast_slow": list(split),
        "fast_alone_tok_s": round(alone_fast, 1),
        "slow_alone_tok_s": round(alone_slow, 1),
        "ratio": round(through / (alone_fast + alone_slow), 3),
        "direct_both_at_once_tok_s": round(both_direct, 1),
        "ratio_to_both_at_once": round(through / both_direct, 3),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps({"one_upstream": one, "two_unequal": two}, indent=2))
        return
    print(
        f"one upstream ({args.threads_fast} threads), {args.rounds} rounds of {args.max_tokens} tokens, medians:"
    )
    print(f"  first token   direct {one['ttft_direct_ms']:7.1f} ms   through exo {one['ttft_exo_ms']:7.1f} ms"
          f"   added {one['ttft_added_ms']:+.1f} ms   (target <= +{TARGET_TTFT_MS:.0f})")  # fmt: skip
    print(f"  decode        direct {one['decode_direct_tok_s']:7.1f} tok/s through exo "
          f"{one['decode_exo_tok_s']:7.1f} tok/s ratio {one['decode_ratio']:.3f} (target >= {TARGET_RATIO})")  # fmt: skip
    print(f"two unequal upstreams ({args.threads_fast} and {slow_threads} threads), {args.clients} clients, "
          f"{args.seconds:.0f} s each:")  # fmt: skip
    print(f"  exo sent {split[0]} requests to the fast one, {split[1]} to the slow one")
    print(f"  through exo {two['exo_both_tok_s']:.1f} tok/s; alone {two['fast_alone_tok_s']:.1f} + "
          f"{two['slow_alone_tok_s']:.1f} tok/s; ratio {two['ratio']:.3f} (target >= {TARGET_BALANCE})")  # fmt: skip

    print(f"  both servers asked directly at once (clients split evenly): {two['direct_both_at_once_tok_s']:.1f} "
          f"tok/s; exo / that {two['ratio_to_both_at_once']:.3f} (what the CPU allows both together)")  # fmt: skip


async def both_at_once(fast: str, slow: str, clients: int, seconds: float, max_tokens: int) -> float:
    """Both servers driven directly at the same time (each by half the clients): the speed the
    machine gives the two together, the baseline balancing can at best reach."""
    half = max(1, clients // 2)
    rates = await asyncio.gather(
        aggregate(fast, half, seconds, max_tokens),
        aggregate(slow, max(1, clients - half), seconds, max_tokens),
    )
    return sum(rates)


async def stream_warm(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(stream(session, base, 8), stream(session, base, 8))


if __name__ == "__main__":
    main()
