"""Benchmark: the MLX engine next to tinygrad and llama.cpp on the embedded SmolLM2-135M.

    .venv/bin/python bench/bench_mlx.py                  # all engines found, table + ratios
    .venv/bin/python bench/bench_mlx.py --repeat 2 --profile  # best of 2 passes, then MLX's profile
    .venv/bin/python bench/bench_mlx.py --engines mlx --prefill 64 --decode 32 --json out.json

Each engine runs in its own subprocess (so peak RSS is its own), one after the other in the
same run: greedy decode tok/s, prefill tok/s, aggregate decode tok/s of a batch of requests
(engines that batch), and peak RSS. Numbers are medians over --rounds; each round is a new
request (fresh cache). tinygrad is measured when its engine is registered, llama.cpp when
llama-cpp-python is installed; missing ones are listed as skipped with the reason. The host is
shared and noisy: compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("mlx", "tinygrad", "llama.cpp")
THREADS = 2


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


def prompt_ids(n: int) -> list[int]:
    """n token ids: a real chat prompt from the reference, repeated."""
    ref = Path(__file__).parents[1] / "tests" / "data" / "smollm2-135m-llamacpp.json"
    ids = json.loads(ref.read_text())["greedy"][2]["prompt_ids"]
    return (ids * (n // len(ids) + 1))[:n]


# ---- one engine, in a worker process ---------------------------------------------------------


def measure_exo_engine(name: str, args) -> dict:
    import numpy as np

    from exo_core.engine import StageInput
    from exo_core.models.shard import Shard
    from exo_core.plugins import registry

    reg = registry()
    cls = reg.engines.get(name)
    if cls is None:
        return {"skipped": f"engine {name!r} is not registered"}
    ok, reason = cls.available()
    if not ok:
        return {"skipped": reason}
    card = reg.models["smollm2-135m"]
    shard = Shard.whole(card.id, card.n_layers)
    engine = cls({"max_context": None})

    async def run() -> dict:
        started = time.perf_counter()
        await engine.load(shard, card)
        load_s = time.perf_counter() - started
        prompt = np.asarray(prompt_ids(args.prefill), dtype=np.int64)
        prefill, decode, answer = [], [], []
        for r in range(args.rounds + 1):  # round 0 warms up (compiles, first-touch)
            rid = f"round-{r}"
            t0 = time.perf_counter()
            out = await engine.forward(shard, StageInput(rid, tokens=prompt))
            t1 = time.perf_counter()
            tokens = []
            for _ in range(args.decode):
                token = int(np.argmax(out.logits))
                tokens.append(token)
                out = await engine.forward(shard, StageInput(rid, tokens=np.asarray([token])))
            t2 = time.perf_counter()
            await engine.release(rid)
            if r == 0 and args.rounds > 0:
                continue
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(args.decode / (t2 - t1))
            answer = tokens
        batch_tok_s = None
        if args.batch > 1:
            rids = [f"batch-{i}" for i in range(args.batch)]
            short = np.asarray(prompt_ids(16), dtype=np.int64)
            last = []
            for rid in rids:
                last.append((await engine.forward(shard, StageInput(rid, tokens=short))).logits)
            steps = max(4, args.decode // 4)
            t0 = time.perf_counter()
            for _ in range(steps):
                items = [
                    StageInput(rid, tokens=np.asarray([int(np.argmax(lg))]))
                    for rid, lg in zip(rids, last, strict=True)
                ]
                last = [o.logits for o in await engine.forward_batch(shard, items)]
            batch_tok_s = args.batch * steps / (time.perf_counter() - t0)
            for rid in rids:
                await engine.release(rid)
        await engine.close()
        return {
            "load_s": load_s,
            "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode),
            "batch_decode_tok_s": batch_tok_s,
            "answer": answer[:16],
        }

    return asyncio.run(run())


def measure_llamacpp(args) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (.venv/bin/pip install llama-cpp-python)"}
    import numpy as np

    from exo_core.models.files import embedded_gguf_path

    started = time.perf_counter()
    llm = llama_cpp.Llama(
        str(embedded_gguf_path()),
        n_ctx=max(512, args.prefill + args.decode + 8),
        n_threads=THREADS,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    prompt = prompt_ids(args.prefill)
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # Without logits_all, llama-cpp-python keeps no scores; read the context's last row.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    prefill, decode, answer = [], [], []
    for r in range(args.rounds + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tokens = []
        for _ in range(args.decode):
            token = int(np.argmax(last_logits()))
            tokens.append(token)
            llm.eval([token])
        t2 = time.perf_counter()
        if r == 0 and args.rounds > 0:
            continue
        prefill.append(len(prompt) / (t1 - t0))
        decode.append(args.decode / (t2 - t1))
        answer = tokens
    return {
        "load_s": load_s,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "batch_decode_tok_s": None,
        "answer": answer[:16],
        "version": llama_cpp.__version__,
    }


def worker(name: str, args) -> None:
    result = measure_llamacpp(args) if name == "llama.cpp" else measure_exo_engine(name, args)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---- profile of MLX's CPU build --------------------------------------------------------------


def profile_mlx(args) -> None:
    """Time each kind of op of one decode step (and one prefill) of the loaded 135M model."""
    import mlx.core as mx
    from exo_mlx.engine import MLXEngine

    from exo_core.models.shard import Shard
    from exo_core.plugins import registry

    card = registry().models["smollm2-135m"]
    shard = Shard.whole(card.id, card.n_layers)
    engine = MLXEngine({})
    asyncio.run(engine.load(shard, card))
    model = engine._model
    assert model is not None
    c = model.config

    def timed(fn, repeat: int = 5) -> float:
        mx.eval(fn())
        t0 = time.perf_counter()
        for _ in range(repeat):
            mx.eval(fn())
        return (time.perf_counter() - t0) / repeat

    def run_in_worker(fn):
        return engine._worker.submit(fn).result()

    def measure() -> list[tuple[str, float, float]]:
        rows = []
        block = model.blocks[0]
        a = block.attention
        for t in (1, args.prefill):
            x = mx.random.normal((1, t, c.hidden_size))
            h = mx.random.normal((1, t, c.intermediate_size))
            flops_layer = 0.0
            linears = {
                "q,k,v,o projections": [(a.q, x), (a.k, x), (a.v, x), (a.o, x)],
                "gate,up projections": [(block.mlp.gate, x), (block.mlp.up, x)],
                "down projection": [(block.mlp.down, h)],
            }
            for label, pairs in linears.items():
                secs = timed(lambda pairs=pairs: [lin(inp) for lin, inp in pairs]) * c.n_layers
                flops = sum(2 * t * lin.weight.shape[0] * inp.shape[-1] for lin, inp in pairs) * c.n_layers
                flops_layer += flops
                rows.append((f"T={t} {label} (x{c.n_layers} layers)", secs, flops / secs / 1e9))
            # Attention core at a context of 256 positions (rope + softmax(QK^T)V), all layers.
            q = mx.random.normal((1, c.n_heads, t, c.head_dim))
            kv = mx.random.normal((1, c.n_kv_heads, 256, c.head_dim))
            secs = timed(
                lambda q=q, kv=kv, t=t: mx.fast.scaled_dot_product_attention(
                    mx.fast.rope(q, c.head_dim, traditional=True, base=c.rope_theta, scale=1.0, offset=0),
                    kv,
                    kv,
                    scale=0.125,
                    mask="causal" if t > 1 else None,
                )
            )
            rows.append((f"T={t} rope + attention over 256 (x{c.n_layers})", secs * c.n_layers, 0.0))
            secs = timed(lambda x=x: [mx.fast.rms_norm(x, block.attn_norm, 1e-5) for _ in range(2)])
            rows.append((f"T={t} rms_norm x2 (x{c.n_layers})", secs * c.n_layers, 0.0))
            last = mx.random.normal((1, c.hidden_size))
            assert model.head is not None
            secs = timed(lambda last=last: model.head(last))
            rows.append(
                (
                    "head (Q8_0 49152x576, last position only)",
                    secs,
                    2 * c.vocab_size * c.hidden_size / secs / 1e9,
                )
            )
            # Dense float32 matmul for comparison: is it quantised matmul or the BLAS?
            dense = mx.random.normal((c.intermediate_size, c.hidden_size))
            secs = timed(lambda x=x, dense=dense: x @ dense.T)
            rows.append(
                (
                    f"T={t} dense f32 matmul 1536x576 (one, for comparison)",
                    secs,
                    2 * t * c.intermediate_size * c.hidden_size / secs / 1e9,
                )
            )
        # A whole decode step, and the time to build its graph without evaluating it.
        caches = [model.new_cache(4096)]
        mx.eval(model(mx.array([prompt_ids(64)]), caches))
        token = mx.array([[42]])
        t0 = time.perf_counter()
        for _ in range(5):
            mx.eval(model(token, caches), *caches[0].keys, *caches[0].values)
        rows.append(("whole decode step (eval)", (time.perf_counter() - t0) / 5, 0.0))
        t0 = time.perf_counter()
        for _ in range(5):
            model(token, [model.new_cache(4096)])  # graph only; nothing evaluated
        rows.append(("  of which: building the graph in Python", (time.perf_counter() - t0) / 5, 0.0))
        return rows

    rows = run_in_worker(measure)
    print(f"\nMLX {mx.__version__} on {mx.default_device()}: where a step's time goes (ms; GFLOP/s)")
    for label, secs, gflops in rows:
        print(f"  {label:<58} {secs * 1e3:9.1f} ms" + (f"  {gflops:6.2f} GFLOP/s" if gflops else ""))
    asyncio.run(engine.close())


# ---- the parent: run each engine, print the table --------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated: mlx,tinygrad,llama.cpp"
    )
    parser.add_argument("--prefill", type=int, default=128, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=64, help="generated tokens per round")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (after one warm-up)")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the engines; best pass kept")
    parser.add_argument("--batch", type=int, default=4, help="requests decoded together (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true", help="profile MLX's ops after the table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    results: dict[str, dict] = {}
    # Passes over all engines, interleaved, keeping each engine's best pass: on a shared host a
    # neighbour's burst can stall one pass (llama.cpp's spinning threads suffer most).
    for attempt in range(args.repeat):
        for name in args.engines.split(","):
            cmd = [sys.executable, __file__, "--worker", name]
            cmd += [
                "--prefill",
                str(args.prefill),
                "--decode",
                str(args.decode),
                "--rounds",
                str(args.rounds),
            ]
            cmd += ["--batch", str(args.batch)]
            env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
            print(f"measuring {name} (pass {attempt + 1}) ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = done.stdout.strip().splitlines()
            try:
                result = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                result = {"skipped": f"failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"}
            results[name] = best_of(results.get(name), result)
    print_table(results, args)
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
        )
    if args.profile:
        profile_mlx(args)


def best_of(old: dict | None, new: dict) -> dict:
    """Per measure, the better of two passes (higher tok/s, lower RSS and load time)."""
    if old is None or "skipped" in old:
        return new
    if "skipped" in new:
        return old
    merged = dict(old)
    for key in ("decode_tok_s", "prefill_tok_s", "batch_decode_tok_s"):
        if new.get(key) is not None and (old.get(key) is None or new[key] > old[key]):
            merged[key] = new[key]
    for key in ("peak_rss_mb", "load_s"):
        merged[key] = min(old[key], new[key])
    return merged


def print_table(results: dict[str, dict], args) -> None:
    measured = {n: r for n, r in results.items() if "skipped" not in r}
    base = measured.get("llama.cpp") or measured.get("mlx")
    base_name = "llama.cpp" if "llama.cpp" in measured else "mlx"
    print(
        f"\nSmolLM2-135M Q4_1 (embedded GGUF), greedy; prefill {args.prefill} tokens, decode {args.decode}, "
        f"batch {args.batch}; medians of {args.rounds} rounds, best of {args.repeat} passes"
    )
    header = f"| engine | decode tok/s | prefill tok/s | batch-{args.batch} decode tok/s | peak RSS MB | load s | decode / {base_name} | prefill / {base_name} |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, r in results.items():
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} |")
            continue
        batch = f"{r['batch_decode_tok_s']:.1f}" if r.get("batch_decode_tok_s") else "-"
        ratio_d = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        ratio_p = r["prefill_tok_s"] / base["prefill_tok_s"] if base else float("nan")
        print(
            f"| {name} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.1f} | {batch} | {r['peak_rss_mb']:.0f} "
            f"| {r['load_s']:.1f} | {ratio_d:.3f} | {ratio_p:.3f} |"
        )
    answers = {n: r["answer"] for n, r in measured.items()}
    if len(answers) > 1:
        # The prompt is a chat prompt repeated to length, so near-ties can flip late tokens;
        # correctness is the tests' job (llama.cpp's answers to real chats).
        names = list(answers)
        first = answers[names[0]]
        for name in names[1:]:
            same = next(
                (i for i, (a, b) in enumerate(zip(first, answers[name], strict=False)) if a != b), None
            )
            agree = len(first) if same is None else same
            print(f"greedy tokens {names[0]} vs {name}: first {agree} of {len(first)} agree")


if __name__ == "__main__":
    main()
