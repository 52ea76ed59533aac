"""Benchmark: the tinygrad engine next to llama.cpp on the embedded SmolLM2-135M (Q4_1 GGUF).

    .venv/bin/python bench/bench_tinygrad.py                 # both engines, table + ratio
    .venv/bin/python bench/bench_tinygrad.py --rounds 3 --json out.json
    .venv/bin/python bench/bench_tinygrad.py --engines tinygrad --decode 32

Each engine runs in its own subprocess, one after the other, so peak RSS is its own: load
time (tinygrad: `prepare`, i.e. load plus every graph read from EXO_HOME or built), the first
request's time to first token, time to first token of a 60-token prompt, prefill tok/s of a
500-token prompt, greedy decode tok/s over 128 tokens, and (tinygrad) the aggregate decode
tok/s of 4 requests decoded as one batch. Every measured prompt starts with a token no other
prompt of the run starts with, so neither side can reuse a cached prefix (llama-cpp-python
keeps the previous prompt's KV). Figures after the first request are medians over --rounds;
the engines run alternately --passes times and the best pass of each figure is kept.
Last, `exo run --prompt ...` is timed twice with a fresh EXO_HOME: the first run ever (it
builds and saves the graphs) and the one after it (it reads them).
llama.cpp (llama-cpp-python, optional: `pip install exo-tinygrad[bench]`) runs with 2 threads
on the same file; when it is not installed the table says so and the tinygrad half still runs.
The host is shared and noisy: compare numbers only within one run.

Long prompts (slow: minutes at 6,000 tokens) are measured only on request, once per pass:

    .venv/bin/python bench/bench_tinygrad.py --rounds 2 --passes 2 --long 2000,6000

adds a row "prefill tok/s, N-token prompt" per length (one request each, after the others).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2
TTFT_PROMPT = 60
ROWS = [
    ("load_s", "load + prepare (s)"),
    ("cold_first_token_s", "first request's first token (s)"),
    ("ttft_s", f"time to first token, {TTFT_PROMPT}-token prompt (s)"),
    ("prefill_tok_s", "prefill tok/s (--prefill prompt)"),
    ("decode_tok_s", "decode tok/s"),
    ("batch_decode_tok_s", "decode tok/s, 4 requests batched"),
    ("peak_rss_mb", "peak RSS (MB)"),
    ("exo_run_first_s", "exo run --prompt, first ever (s)"),
    ("exo_run_second_s", "exo run --prompt, second (s)"),
]
_unique = iter(range(1000, 100000, 7))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def prompt_ids(n: int) -> list[int]:
    """n token ids: a real chat prompt from the llama.cpp reference data, repeated, after a
    first token no other prompt of this process starts with (no reusable cached prefix)."""
    ref = Path(__file__).parents[1] / "tests" / "data" / "smollm2-135m-llamacpp.json"
    ids = json.loads(ref.read_text(encoding="utf-8"))["greedy"][2]["prompt_ids"]
    return [next(_unique), *(ids * (n // len(ids) + 1))[: n - 1]]


# ---- workers (one per engine, in a subprocess) ------------------------------------------------


def measure_tinygrad(args) -> dict:
    import numpy as np

    from exo_core.engine import StageInput
    from exo_core.models.shard import Shard
    from exo_core.plugins import registry

    reg = registry()
    cls = reg.engines.get("tinygrad")
    if cls is None:
        return {"skipped": "the tinygrad engine is not registered (pip install -e plugins/exo-tinygrad)"}
    ok, reason = cls.available()
    if not ok:
        return {"skipped": reason}
    card = reg.models["smollm2-135m"]
    shard = Shard.whole(card.id, card.n_layers)
    engine = cls({"max_context": None})

    async def request(rid: str, n_prompt: int, decode: int) -> tuple[float, float]:
        prompt = np.asarray(prompt_ids(n_prompt), dtype=np.int64)
        t0 = time.perf_counter()
        out = await engine.forward(shard, StageInput(rid, tokens=prompt))
        token = int(np.argmax(out.logits))
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for k in range(decode):
            step = StageInput(rid, tokens=np.asarray([token]), start_pos=len(prompt) + k)
            out = await engine.forward(shard, step)
            token = int(np.argmax(out.logits))
        decode_s = time.perf_counter() - t1
        await engine.release(rid)
        return ttft, decode_s

    async def batch(tag: str, n: int, steps: int) -> float:
        ids = [f"{tag}-{k}" for k in range(n)]
        tokens = []
        for k, rid in enumerate(ids):  # prompts of different lengths: different positions
            prompt = np.asarray(prompt_ids(32 + 8 * k), dtype=np.int64)
            out = await engine.forward(shard, StageInput(rid, tokens=prompt))
            tokens.append(int(np.argmax(out.logits)))
        t0 = time.perf_counter()
        for k in range(steps):
            items = [
                StageInput(rid, tokens=np.asarray([t]), start_pos=32 + 8 * i + k)
                for i, (rid, t) in enumerate(zip(ids, tokens, strict=True))
            ]
            outs = await engine.forward_batch(shard, items)
            tokens = [int(np.argmax(o.logits)) for o in outs]
        elapsed = time.perf_counter() - t0
        for rid in ids:
            await engine.release(rid)
        return n * steps / elapsed

    async def run() -> dict:
        t0 = time.perf_counter()
        prepare = getattr(engine, "prepare", None)
        await (prepare(shard, card) if prepare is not None else engine.load(shard, card))
        load_s = time.perf_counter() - t0
        cold_ttft, _ = await request("cold", TTFT_PROMPT, 0)
        ttfts, prefills, decodes = [], [], []
        for r in range(args.rounds):
            ttfts.append((await request(f"ttft-{r}", TTFT_PROMPT, 0))[0])
            prefill_s, decode_s = await request(f"round-{r}", args.prefill, args.decode)
            prefills.append(args.prefill / prefill_s)
            decodes.append(args.decode / decode_s)
        batched = [await batch(f"batch-{r}", 4, args.decode // 2) for r in range(args.rounds)]
        long = {}
        for n in long_lengths(args):
            prefill_s, _ = await request(f"long-{n}", n, 0)
            long[f"prefill_{n}_tok_s"] = n / prefill_s
        return {
            **long,
            "load_s": load_s,
            "cold_first_token_s": cold_ttft,
            "ttft_s": statistics.median(ttfts),
            "prefill_tok_s": statistics.median(prefills),
            "decode_tok_s": statistics.median(decodes),
            "batch_decode_tok_s": statistics.median(batched),
        }

    result = asyncio.run(run())
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def measure_llamacpp(args) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install 'exo-tinygrad[bench]')"}
    import numpy as np

    from exo_core.models.files import embedded_gguf_path

    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(embedded_gguf_path()),
        n_threads=THREADS,
        n_threads_batch=THREADS,
        n_ctx=max(args.prefill, TTFT_PROMPT, *long_lengths(args)) + args.decode + 16,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    load_s = time.perf_counter() - t0

    def last_logits() -> np.ndarray:
        # the last evaluated position's logits (llm.scores is only filled with logits_all)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    def request(n_prompt: int, decode: int) -> tuple[float, float]:
        prompt = prompt_ids(n_prompt)
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(last_logits()))
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(decode):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        return ttft, time.perf_counter() - t1

    cold_ttft, _ = request(TTFT_PROMPT, 0)
    ttfts = [request(TTFT_PROMPT, 0)[0] for _ in range(args.rounds)]
    runs = [request(args.prefill, args.decode) for _ in range(args.rounds)]
    long = {f"prefill_{n}_tok_s": n / request(n, 0)[0] for n in long_lengths(args)}
    return {
        **long,
        "load_s": load_s,
        "cold_first_token_s": cold_ttft,
        "ttft_s": statistics.median(ttfts),
        "prefill_tok_s": statistics.median(args.prefill / r[0] for r in runs),
        "decode_tok_s": statistics.median(args.decode / r[1] for r in runs),
        "peak_rss_mb": peak_rss_mb(),
    }


def long_lengths(args) -> list[int]:
    return [int(n) for n in (args.long or "").split(",") if n.strip()]


WORKERS = {"tinygrad": measure_tinygrad, "llama.cpp": measure_llamacpp}


# ---- driver --------------------------------------------------------------------------------


def time_exo_run() -> dict:
    """Wall clock of `exo run --prompt ...` twice with a fresh EXO_HOME: first ever, then second."""
    import os
    import tempfile

    exo = str(Path(sys.executable).with_name("exo"))
    cmd = [exo, "run", "--prompt", "What is the capital of France? Answer in one word."]
    out: dict = {}
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "EXO_HOME": home}
        for key in ("exo_run_first_s", "exo_run_second_s"):
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                return {"exo_run_error": done.stderr.strip().splitlines()[-1:]}
            out[key] = time.perf_counter() - t0
    return out


def best(old: dict | None, new: dict) -> dict:
    """Per figure, the better of two passes (rates: higher; times and memory: lower)."""
    if old is None or "skipped" in old:
        return new
    if "skipped" in new:
        return old
    merged = dict(old)
    for key, value in new.items():
        if isinstance(value, (int, float)) and isinstance(old.get(key), (int, float)):
            merged[key] = max(value, old[key]) if key.endswith("tok_s") else min(value, old[key])
    return merged


def run_worker(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--prefill", str(args.prefill)]
    cmd += ["--decode", str(args.decode), "--rounds", str(args.rounds), "--long", args.long or ""]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"skipped": f"worker failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}"}
    return json.loads(lines[-1])


def table(results: dict[str, dict], lengths: list[int]) -> str:
    names = list(results)
    head = ["", *names]
    if len(names) == 2:
        head.append(f"{names[0]} / {names[1]}")
    rows = [head]
    rows_wanted = list(ROWS)
    at = [k for k, _ in ROWS].index("decode_tok_s")
    rows_wanted[at:at] = [(f"prefill_{n}_tok_s", f"prefill tok/s, {n}-token prompt") for n in lengths]
    for key, label in rows_wanted:
        row = [label]
        values = [results[n].get(key) for n in names]
        row += ["-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in values]
        if len(names) == 2:
            a, b = values
            row.append(f"{a / b:.2f}x" if a is not None and b else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for n in names:
        if "skipped" in results[n]:
            lines.append(f"{n}: skipped: {results[n]['skipped']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engines", default="tinygrad,llama.cpp", help="comma-separated: tinygrad, llama.cpp"
    )
    parser.add_argument("--prefill", type=int, default=500, help="prompt tokens of the prefill measurement")
    parser.add_argument("--decode", type=int, default=128, help="tokens decoded per request")
    parser.add_argument("--rounds", type=int, default=2, help="measured requests per engine (median)")
    parser.add_argument("--passes", type=int, default=2, help="passes over the engines (best kept)")
    parser.add_argument(
        "--long", default="", help="comma-separated long prompt lengths to prefill once (e.g. 2000,6000)"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-exo-run", action="store_true", help="skip timing `exo run --prompt`")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    results: dict[str, dict] = {}
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    for p in range(args.passes):  # engines alternate, so both see the same noise; best pass kept
        for name in names:
            print(f"pass {p + 1}/{args.passes}: measuring {name} ...", file=sys.stderr, flush=True)
            result = run_worker(name, args) if name in WORKERS else {"skipped": "unknown engine"}
            if name == "tinygrad" and not args.no_exo_run and "skipped" not in result:
                print("timing exo run --prompt ...", file=sys.stderr, flush=True)
                result.update(time_exo_run())
            print(f"pass {p + 1} {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
            results[name] = best(results.get(name), result)
    print(
        f"SmolLM2-135M Q4_1, {args.prefill}-token prefill, {args.decode} decoded tokens, "
        f"{THREADS} llama.cpp threads"
    )
    print(table(results, long_lengths(args)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
