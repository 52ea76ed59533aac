"""Cluster benchmark: decode speed over 1, 2 and 3 nodes on loopback, per-hop cost, concurrent
streams over a 2-node pipeline, and the stall after a stage is killed.

    .venv/bin/python bench/bench_cluster.py                 # real engine if installed, else dummy
    .venv/bin/python bench/bench_cluster.py --engine dummy --dummy-delay-ms 20
    .venv/bin/python bench/bench_cluster.py --engine dummy --rounds 10 --passes 4 --decode-only  # per-hop only

Three real `exo` processes (manual discovery, one shared peers file) are started once; the peers
file is rewritten to make the cluster 1, 2, then 3 nodes, and every request goes to node `a`.
All ratios are against the 1-node figure of the same run (the host is shared and noisy), and
with `--passes` the 1-, 2- and 3-node figures are measured in turn, several times over.
Decode tok/s is measured between the first and the last streamed token of a greedy answer;
the per-hop cost is (ms/token with N nodes - ms/token with 1 node) / N, a ring of N nodes
having N hops per token. Aggregate tok/s counts the decode tokens (all but each stream's first)
of k simultaneous streams over the time from the first first-token to the last token. The
stall is the gap from `kill -9` of stage 2 to the next token the client receives; "detected"
is when the origin logged the re-plan (the rest is the engine reloading and replaying).

Long-prompt TTFT (pipelined prefill): a ~2,000-token prompt's (`--prompt-words 700`) time to first token on one node
and on two, each in a cluster of its own started for it (tinygrad: the single node gets both
cores, each of the two nodes one thread, so both cases use the whole machine); the median of
`--rounds` requests after a warm-up.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from exo_core.testing.cluster import Cluster

PROMPT = [{"role": "user", "content": "Write a short story about a robot."}]


def pick_engine(name: str | None) -> str:
    if name:
        return name
    from exo_core.plugins import registry

    engines = registry().engines
    for candidate in ("tinygrad", "mlx"):
        if candidate in engines and engines[candidate].available()[0]:
            return candidate
    return "dummy"


def stream_once(cluster: Cluster, node_id: str, max_tokens: int) -> tuple[list[float], float]:
    """Arrival times of the tokens of one greedy stream, and when the request was sent."""
    sent = time.monotonic()
    arrivals = []
    for at, event in cluster.stream_chat(node_id, PROMPT, max_tokens=max_tokens):
        if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
            arrivals.append(at)
    return arrivals, sent


def decode_rates(cluster: Cluster, max_tokens: int, rounds: int) -> list[float]:
    """Decode tok/s of each of `rounds` greedy streams."""
    rates = []
    for _ in range(rounds):
        arrivals, _ = stream_once(cluster, "a", max_tokens)
        if len(arrivals) >= 2:
            rates.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
    return rates


def wait_warm(cluster: Cluster, members: list[str], timeout: float = 300.0) -> None:
    """Wait (idle: tinygrad builds graphs only between answers) until every member has finished
    warming each shard it started warming (its log says `warm` for each `warming`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        logs = [cluster.nodes[m].log().splitlines() for m in members]
        started = [sum("warming" in line and "engine=" in line for line in log) for log in logs]
        done = [sum(bool(re.search(r"\] warm\s+seconds=", line)) for line in log) for log in logs]
        if started == done:
            return


def warm_until_steady(cluster: Cluster, max_tokens: int, tries: int = 12) -> None:
    """Stream until two streams in a row decode within 10% of each other: an engine that builds
    its graphs in the background speeds up meanwhile (tinygrad), and that is not the cluster."""
    last = 0.0
    for _ in range(tries):
        (rate,) = decode_rates(cluster, max_tokens, 1) or [0.0]
        if last and abs(rate - last) <= 0.1 * last:
            return
        last = rate


def aggregate_tps(cluster: Cluster, streams: int, max_tokens: int) -> float:
    """Decode tokens of all streams over the time from the first one's first token to the last token."""
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: stream_once(cluster, "a", max_tokens), range(streams)))
    start = min(arrivals[0] for arrivals, _ in results)
    end = max(arrivals[-1] for arrivals, _ in results)
    return sum(len(arrivals) - 1 for arrivals, _ in results) / (end - start)


def long_prompt_ttft(
    engine: str, nodes: list[str], extra: list[str], words: int, rounds: int
) -> tuple[float, int]:
    """Median seconds to the first token of a long prompt (and its token count), on its own cluster."""

    def prompt(round_: int) -> list[dict[str, str]]:  # each its own: no prefix cache helps
        text = f"Text {round_}. Summarise it: " + " ".join(
            f"w{(i * (round_ + 3)) % 97}" for i in range(words)
        )
        return [{"role": "user", "content": text}]

    with (
        tempfile.TemporaryDirectory() as tmp,
        Cluster.manual(nodes, tmp=Path(tmp), engine=engine, extra_args=extra, timeout=300) as cluster,
    ):
        status, reply = cluster.post(
            "a",
            "/v1/chat/completions",
            {"model": "smollm2-135m", "messages": prompt(0), "max_tokens": 1},
            600,
        )  # warm-up, and the prompt's length
        assert status == 200, reply
        times = []
        for round_ in range(1, rounds + 1):
            sent = time.monotonic()
            for at, _event in cluster.stream_chat("a", prompt(round_), max_tokens=1, timeout=600):
                times.append(at - sent)
                break
        return statistics.median(times), int(reply["usage"]["prompt_tokens"])


def _replan_logged_at(log: str) -> float:
    """Wall time of the origin's last "re-planning" log line (nan when there is none)."""
    from datetime import datetime

    stamps = [line.split()[0] for line in log.splitlines() if "stage failed; re-planning" in line]
    if not stamps:
        return float("nan")
    return datetime.fromisoformat(stamps[-1].replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", help="engine for every node (default: tinygrad, else mlx, else dummy)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per measured stream")
    parser.add_argument("--rounds", type=int, default=2, help="streams per decode figure (median)")
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="decode: go over 1, 2 and 3 nodes this many times, `--rounds` streams each time",
    )
    parser.add_argument("--dummy-delay-ms", type=float, default=20.0, help="dummy engine: ms per token")
    parser.add_argument(
        "--prompt-words", type=int, default=700, help="long-prompt TTFT: words (~3 tokens each)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="only decode over 1, 2 and 3 nodes and the per-hop cost (no streams, kill or long prompt)",
    )
    args = parser.parse_args()
    engine = pick_engine(args.engine)
    # The dummy engine spends its delay blocking a thread, as real compute does (an asyncio sleep
    # would hide the cost of waking the event loop from the engine's thread).
    extra = ["--dummy-delay-ms", str(args.dummy_delay_ms), "--dummy-blocking"] if engine == "dummy" else []
    tokens = min(args.tokens, 16) if engine == "dummy" else args.tokens  # the dummy answer is 16 tokens
    results: dict[str, float] = {}
    print(f"engine: {engine}; {tokens} tokens per stream; requests to node a", flush=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        Cluster.manual(
            ["a", "b", "c"], tmp=Path(tmp), engine=engine, extra_args=extra, listed=["a"], timeout=300
        ) as cluster,
    ):
        ms = {}
        rates: dict[int, list[float]] = {1: [], 2: [], 3: []}
        for _ in range(args.passes):  # 1, 2, 3 nodes in turn, so a drift of the host hits all
            for members in (["a"], ["a", "b"], ["a", "b", "c"]):
                cluster.list_peers(members)
                cluster.wait_members("a", set(members))
                stream_once(cluster, "a", 4)  # warm-up: the new plan loads its shards
                wait_warm(cluster, members)
                warm_until_steady(cluster, tokens)
                rates[len(members)] += decode_rates(cluster, tokens, args.rounds)
        for n in (1, 2, 3):
            results[f"decode_tps_{n}"] = statistics.median(rates[n])
            ms[n] = 1000 / results[f"decode_tps_{n}"]
            print(f"  {n} node(s): {results[f'decode_tps_{n}']:.1f} tok/s ({ms[n]:.1f} ms/token)", flush=True)
        for n in (2, 3):
            results[f"ratio_{n}_vs_1"] = results[f"decode_tps_{n}"] / results["decode_tps_1"]
            results[f"per_hop_ms_{n}"] = (ms[n] - ms[1]) / n
            print(f"  per-hop cost, {n} nodes: {results[f'per_hop_ms_{n}']:.2f} ms/token", flush=True)
        if args.decode_only:
            if args.json:
                args.json.write_text(json.dumps({"engine": engine, **results}, indent=2))
            return 0

        cluster.list_peers(["a", "b"])
        cluster.wait_members("a", {"a", "b"})
        stream_once(cluster, "a", 4)
        for k in (1, 2, 4):
            results[f"aggregate_tps_{k}_streams"] = aggregate_tps(cluster, k, tokens)
            print(
                f"  2-node pipeline, {k} stream(s): {results[f'aggregate_tps_{k}_streams']:.1f} tok/s",
                flush=True,
            )
        for k in (2, 4):
            results[f"aggregate_ratio_{k}_vs_1"] = (
                results[f"aggregate_tps_{k}_streams"] / results["aggregate_tps_1_streams"]
            )

        arrivals, killed_at = [], None
        for at, event in cluster.stream_chat("a", PROMPT, max_tokens=tokens):
            if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                arrivals.append(at)
            if len(arrivals) == tokens // 3 and killed_at is None:
                killed_wall = time.time()
                cluster.nodes["b"].kill()
                killed_at = time.monotonic()
        after = [t for t in arrivals if killed_at is not None and t > killed_at]
        results["stall_after_kill_s"] = (after[0] - killed_at) if after and killed_at else float("nan")
        results["tokens_after_kill"] = len(arrivals)
        results["failure_detected_s"] = _replan_logged_at(cluster.nodes["a"].log()) - killed_wall

    threads = {1: ["--threads", "2"], 2: ["--threads", "1"]} if engine == "tinygrad" else {1: [], 2: []}
    for n in (1, 2):
        ttft, prompt_tokens = long_prompt_ttft(
            engine, ["a", "b"][:n], extra + threads[n], args.prompt_words, max(args.rounds, 2)
        )
        results[f"long_prompt_ttft_{n}"] = ttft
        print(f"  {n} node(s): {prompt_tokens}-token prompt, TTFT {ttft:.2f} s", flush=True)
    results["long_prompt_tokens"] = prompt_tokens
    results["long_prompt_ttft_ratio_2_vs_1"] = results["long_prompt_ttft_2"] / results["long_prompt_ttft_1"]

    print()
    print(f"| measure ({engine}, loopback, one run) | value | target |")
    print("|---|---|---|")
    for n in (1, 2, 3):
        print(f"| decode, {n} node(s) | {results[f'decode_tps_{n}']:.1f} tok/s | |")
    print(f"| decode, 2 nodes vs 1 | {results['ratio_2_vs_1']:.2f}x | >= 0.95x (tinygrad) |")
    print(f"| 3 nodes vs 1 | {results['ratio_3_vs_1']:.2f}x | |")
    print(f"| per-hop cost, 2 nodes | {results['per_hop_ms_2']:.2f} ms/token | < 1 ms |")
    print(f"| per-hop cost, 3 nodes | {results['per_hop_ms_3']:.2f} ms/token | < 1 ms |")
    for k in (1, 2, 4):
        print(
            f"| 2-node pipeline, {k} stream(s) | {results[f'aggregate_tps_{k}_streams']:.1f} tok/s aggregate | |"
        )
    print(f"| 4 streams vs 1 | {results['aggregate_ratio_4_vs_1']:.2f}x | >= 1.5x |")
    print(f"| stall after kill -9 of stage 2 | {results['stall_after_kill_s']:.2f} s | < 3 s |")
    print(f"| failure detected (re-plan logged) after | {results['failure_detected_s']:.3f} s | |")
    print(f"| tokens streamed across the kill | {results['tokens_after_kill']:.0f} / {tokens} | all |")
    n_prompt = results["long_prompt_tokens"]
    for n in (1, 2):
        print(f"| {n_prompt}-token prompt, TTFT, {n} node(s) | {results[f'long_prompt_ttft_{n}']:.2f} s | |")
    print(f"| long-prompt TTFT, 2 nodes vs 1 | {results['long_prompt_ttft_ratio_2_vs_1']:.2f}x | <= 0.75x |")
    if args.json:
        args.json.write_text(json.dumps({"engine": engine, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
