"""Benchmark: what the tinygrad engine's memory is made of, next to llama.cpp's peak RSS.

    .venv/bin/python bench/bench_tinygrad_memory.py                  # both engines, table + ratio
    .venv/bin/python bench/bench_tinygrad_memory.py --no-prepare --decode 16

Each engine runs in its own subprocess on the embedded SmolLM2-135M (Q4_1 GGUF). The tinygrad
worker prints RSS (and its private part, USS) after each step of a run shaped like
`bench/bench_tinygrad.py`'s: imports, load (the engine's own weight accounting next to it),
`prepare` (every graph read from EXO_HOME or built), a 60-token request, a --prefill-token
prompt decoded for --decode tokens, and 4 requests decoded as one batch. llama.cpp
(llama-cpp-python, 2 threads, `n_ctx` as in bench_tinygrad.py) runs the 60-token and
--prefill-token requests. Peak RSS is the process's high-water mark (`ru_maxrss`); the last
line is the ratio of the two peaks, the figure issue 12 bounds (<= 1.5x). Memory does not
depend on the host's load as timings do, but the ratio is still only meaningful within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_tinygrad import THREADS, TTFT_PROMPT, prompt_ids


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _snapshot(steps: list[dict], name: str, **extra) -> None:
    import psutil

    info = psutil.Process().memory_full_info()
    steps.append(
        {"step": name, "rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20, "peak_mb": _peak_mb(), **extra}
    )


def measure_tinygrad(args) -> dict:
    steps: list[dict] = []
    _snapshot(steps, "python")
    import numpy as np

    _snapshot(steps, "numpy")
    from exo_tinygrad.engine import TinygradEngine, _configure_tinygrad

    _configure_tinygrad({})
    import tinygrad  # noqa: F401

    from exo_core import Shard, StageInput
    from exo_core.plugins import registry

    _snapshot(steps, "tinygrad + exo_core imported")
    card = registry().models["smollm2-135m"]
    shard = Shard.whole(card.id, card.n_layers)
    engine = TinygradEngine({"max_context": None})

    async def request(rid: str, n_prompt: int, decode: int) -> None:
        prompt = np.asarray(prompt_ids(n_prompt), dtype=np.int64)
        out = await engine.forward(shard, StageInput(rid, tokens=prompt))
        for k in range(decode):
            token = np.asarray([int(np.argmax(out.logits))])
            out = await engine.forward(shard, StageInput(rid, tokens=token, start_pos=n_prompt + k))

    async def run() -> None:
        t0 = time.perf_counter()
        await engine.load(shard, card)
        _snapshot(
            steps, "weights loaded", weights_mb=engine.weight_bytes() / 2**20, s=time.perf_counter() - t0
        )
        if args.prepare:
            t0 = time.perf_counter()
            await engine.prepare(shard, card)
            _snapshot(steps, "prepare (graphs)", s=time.perf_counter() - t0)
        await request("ttft", TTFT_PROMPT, 0)
        _snapshot(steps, f"{TTFT_PROMPT}-token request", caches_mb=engine.cache_bytes() / 2**20)
        await engine.release("ttft")
        await request("long", args.prefill, args.decode)
        _snapshot(steps, f"{args.prefill} + {args.decode} tokens", caches_mb=engine.cache_bytes() / 2**20)
        await engine.release("long")
        ids = [f"batch-{k}" for k in range(4)]
        tokens = []
        for k, rid in enumerate(ids):
            out = await engine.forward(shard, StageInput(rid, tokens=np.asarray(prompt_ids(32 + 8 * k))))
            tokens.append(int(np.argmax(out.logits)))
        for k in range(args.decode // 2):
            items = [
                StageInput(rid, tokens=np.asarray([t]), start_pos=32 + 8 * i + k)
                for i, (rid, t) in enumerate(zip(ids, tokens, strict=True))
            ]
            tokens = [int(np.argmax(o.logits)) for o in await engine.forward_batch(shard, items)]
        _snapshot(steps, "4 requests batched", caches_mb=engine.cache_bytes() / 2**20)
        for rid in ids:
            await engine.release(rid)

    asyncio.run(run())
    _snapshot(steps, "requests released")
    return {"steps": steps, "peak_mb": _peak_mb()}


def measure_llamacpp(args) -> dict:
    steps: list[dict] = []
    _snapshot(steps, "python")
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install 'exo-tinygrad[bench]')"}

    from exo_core.models.files import embedded_gguf_path

    _snapshot(steps, "llama_cpp imported")
    llm = Llama(
        model_path=str(embedded_gguf_path()),
        n_threads=THREADS,
        n_threads_batch=THREADS,
        n_ctx=max(args.prefill, TTFT_PROMPT) + args.decode + 16,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    _snapshot(steps, "weights loaded")
    for n, decode in ((TTFT_PROMPT, 0), (args.prefill, args.decode)):
        llm.reset()
        llm.eval(prompt_ids(n))
        for _ in range(decode):
            llm.eval([0])
        _snapshot(steps, f"{n} + {decode} tokens")
    return {"steps": steps, "peak_mb": _peak_mb()}


WORKERS = {"tinygrad": measure_tinygrad, "llama.cpp": measure_llamacpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="tinygrad,llama.cpp")
    parser.add_argument("--prefill", type=int, default=500, help="prompt tokens of the long request")
    parser.add_argument("--decode", type=int, default=128, help="tokens decoded after it")
    parser.add_argument("--no-prepare", dest="prepare", action="store_false", help="skip engine.prepare")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    results = {}
    for name in [n.strip() for n in args.engines.split(",") if n.strip()]:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", name, "--prefill", str(args.prefill)]
        cmd += ["--decode", str(args.decode)] + ([] if args.prepare else ["--no-prepare"])
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            results[name] = {"skipped": (done.stderr.strip().splitlines() or [str(done.returncode)])[-1]}
            continue
        results[name] = json.loads(lines[-1])
    for name, result in results.items():
        print(f"\n{name}")
        if "skipped" in result:
            print(f"  skipped: {result['skipped']}")
            continue
        print(f"  {'after':34s} {'RSS MB':>8s} {'USS MB':>8s} {'peak MB':>8s}  notes")
        for s in result["steps"]:
            notes = ", ".join(
                f"{k} {v:.1f}" for k, v in s.items() if k not in ("step", "rss_mb", "uss_mb", "peak_mb")
            )
            print(f"  {s['step']:34s} {s['rss_mb']:8.0f} {s['uss_mb']:8.0f} {s['peak_mb']:8.0f}  {notes}")
    peaks = {n: r["peak_mb"] for n, r in results.items() if "peak_mb" in r}
    if len(peaks) == 2 and "tinygrad" in peaks and "llama.cpp" in peaks:
        ratio = peaks["tinygrad"] / peaks["llama.cpp"]
        print(
            f"\npeak RSS: tinygrad {peaks['tinygrad']:.0f} MB, llama.cpp {peaks['llama.cpp']:.0f} MB: "
            f"{ratio:.2f}x (issue 12's bound: 1.5x)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
