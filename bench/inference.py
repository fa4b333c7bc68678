"""Inference benchmark: the local model called directly versus through the mesh.

    .venv/bin/python bench/inference.py [--rounds 5] [--max-tokens 128] [--threads 2]

(a) direct: llama-cpp-python's `create_chat_completion(stream=True)` on the
    SmolLM2 GGUF in this process -- the least code that does the job;
(b) rpc: `inference.generate` streamed from a worker started as
    `python -m services.inference` in its own process, found through the DHT,
    over CurveZMQ + msgpack, one chunk per token.
Same prompt, temperature 0, seed, max_tokens and thread count; the context is
reset before each direct run, as the worker does. Rounds alternate direct/rpc
(the two never run at once) and the best and the median of each are reported,
because these machines are shared and noisy. tokens/s is completion tokens over
the time from the call to the last token, as a caller sees it; time to first
token likewise. Also the worker's resident memory. The last line is JSON.

(c) batch: the same worker also serves the model with continuous batching
    (`"batch": true`, 4 slots: backends/batched.py) as "smollm2-batch". Each
    round also runs 4 streams of the same request on it at once:
    `batch4_tokens_per_s` is their completion tokens over the time from the
    first call to the last token (best round), beside `batch1_tokens_per_s`,
    one stream alone on it; `batch_join_ttft_ms` is the time to first token of
    a request sent once 3 others are generating, beside
    `batch_idle_ttft_ms`, the same request on the idle model (best rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.config import MeshConfig, Secret  # noqa: E402
from shared.dht import model_topic  # noqa: E402
from shared.identity import MeshCredential  # noqa: E402
from shared.runner import join_mesh  # noqa: E402
from services.inference.backends.local import default_gguf  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper who befriends a whale."}]
SEED = 7
BATCHED = "smollm2-batch"


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_direct(llm, max_tokens: int) -> dict:
    llm.reset()
    started = time.perf_counter()
    first, pieces = None, []
    for chunk in llm.create_chat_completion(MESSAGES, max_tokens=max_tokens, temperature=0.0, seed=SEED,
                                            stream=True):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            first = first or time.perf_counter()
            pieces.append(text)
    return {"seconds": time.perf_counter() - started, "ttft": (first or started) - started, "text": "".join(pieces)}


async def run_rpc(client, max_tokens: int, model: str = "smollm2") -> dict:
    params = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED}
    started = time.perf_counter()
    first, pieces, final = None, [], {}
    stream = await client.mesh.topic(model_topic(model)).stream("inference.generate", params, timeout=120)
    async for chunk in stream:
        if "text" in chunk:
            first = first or time.perf_counter()
            pieces.append(chunk["text"])
        else:
            final = chunk
    return {"seconds": time.perf_counter() - started, "ttft": (first or started) - started,
            "text": "".join(pieces), "tokens": final["usage"]["completion_tokens"], "worker": final["timing"]}


async def run_batch4(client, max_tokens: int) -> dict:
    """Four streams at once on the batched model: their tokens over the wall time."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(run_rpc(client, max_tokens, BATCHED) for _ in range(4)))
    return {"seconds": time.perf_counter() - started, "tokens": sum(r["tokens"] for r in runs),
            "same": all(r["text"] == runs[0]["text"] for r in runs), "text": runs[0]["text"]}


async def run_join(client, max_tokens: int) -> float:
    """Time to first token of a request joining 3 running streams on the batched model."""
    started = [asyncio.Event() for _ in range(3)]

    async def running(flag: asyncio.Event) -> None:
        params = {"model": BATCHED, "messages": MESSAGES, "max_tokens": max_tokens * 4, "temperature": 0.0}
        stream = await client.mesh.topic(model_topic(BATCHED)).stream("inference.generate", params, timeout=120)
        async for chunk in stream:
            if "text" in chunk:
                flag.set()

    tasks = [asyncio.create_task(running(flag)) for flag in started]
    try:
        await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in started)), 60)
        return (await run_rpc(client, 8, BATCHED))["ttft"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def start_worker(data_dir: Path, secret: str, seed: str, threads: int) -> subprocess.Popen:
    models = {"smollm2": {"backend": "local", "slots": 1, "n_threads": threads},
              BATCHED: {"backend": "local", "slots": 4, "batch": True, "n_threads": threads}}
    env = {**os.environ, "INFERSWARM_DATA_DIR": str(data_dir), "INFERSWARM_MESH_SECRET": secret,
           "INFERSWARM_BOOTSTRAP": seed, "INFERSWARM_MODELS": json.dumps(models),
           "INFERSWARM_CACHE_TTL": "0", "INFERSWARM_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "services.inference"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def summary(rounds: list[dict], tokens: int) -> dict:
    rates = [tokens / r["seconds"] for r in rounds]
    ttfts = [r["ttft"] * 1000 for r in rounds]
    return {"best": max(rates), "median": statistics.median(rates),
            "ttft_best_ms": min(ttfts), "ttft_median_ms": statistics.median(ttfts)}


async def main(rounds: int, max_tokens: int, threads: int) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(default_gguf()), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    secret = MeshCredential.new_secret().hex()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        async with AsyncExitStack() as stack:
            client = await join_mesh(stack, "bench", MeshConfig(data_dir=Path(tmp) / "bench",
                                                                mesh_secret=Secret(secret)))
            worker = start_worker(Path(tmp) / "worker", secret, client.discovery.address, threads)
            try:
                ready = json.loads(await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 60))
                assert ready["ready"] == "inference", ready
                await run_rpc(client, 8)  # warm up all paths
                await run_rpc(client, 8, BATCHED)
                run_direct(llm, 8)
                direct, rpc, batch1, batch4, idle_ttft, join_ttft = [], [], [], [], [], []
                for _ in range(rounds):
                    direct.append(run_direct(llm, max_tokens))
                    rpc.append(await run_rpc(client, max_tokens))
                    batch1.append(await run_rpc(client, max_tokens, BATCHED))
                    batch4.append(await run_batch4(client, max_tokens))
                    idle_ttft.append((await run_rpc(client, 8, BATCHED))["ttft"])
                    join_ttft.append(await run_join(client, max_tokens))
                worker_rss = rss_mb(worker.pid)
            finally:
                worker.send_signal(signal.SIGTERM)
                await asyncio.to_thread(worker.wait, 30)
    tokens = rpc[0]["tokens"]
    same = all(r["text"] == direct[0]["text"] for r in direct + rpc)
    batch_same = all(b["text"] == rpc[0]["text"] for b in batch1 + batch4) and all(b["same"] for b in batch4)
    d, r, b1 = summary(direct, tokens), summary(rpc, tokens), summary(batch1, tokens)
    b4 = max(b["tokens"] / b["seconds"] for b in batch4)
    print(f"SmolLM2-135M-Instruct, {threads} threads, {tokens} completion tokens, {rounds} rounds, "
          f"same text on both paths: {same}")
    print(f"{'path':>8} | {'best tok/s':>10} {'median tok/s':>12} | {'best ttft ms':>12} {'median ttft ms':>14}")
    for name, s in (("direct", d), ("rpc", r), ("batch1", b1)):
        print(f"{name:>8} | {s['best']:>10.1f} {s['median']:>12.1f} | {s['ttft_best_ms']:>12.1f} "
              f"{s['ttft_median_ms']:>14.1f}")
    print(f"batch of 4 streams: {b4:.1f} tok/s aggregate ({b4 / r['best']:.2f}x one stream); time to first "
          f"token joining 3 running streams {min(join_ttft) * 1000:.1f} ms vs idle {min(idle_ttft) * 1000:.1f} ms; "
          f"batched text the same as unbatched rpc, alone and 4 at once: {batch_same}")
    print(f"worker RSS {worker_rss:.0f} MB; this process (model loaded) {rss_mb(os.getpid()):.0f} MB")
    print(json.dumps({
        "tokens_per_s_direct": round(d["best"], 1), "tokens_per_s_rpc": round(r["best"], 1),
        "tokens_per_s_ratio": round(r["best"] / d["best"], 3),
        "tokens_per_s_ratio_median": round(r["median"] / d["median"], 3),
        "batch4_tokens_per_s": round(b4, 1), "batch1_tokens_per_s": round(b1["best"], 1),
        "batch4_ratio": round(b4 / r["best"], 3),
        "ttft_ms_direct": round(d["ttft_best_ms"], 1), "ttft_ms_rpc": round(r["ttft_best_ms"], 1),
        "batch_join_ttft_ms": round(min(join_ttft) * 1000, 1), "batch_idle_ttft_ms": round(min(idle_ttft) * 1000, 1),
        "worker_rss_mb": round(worker_rss, 1), "completion_tokens": tokens, "rounds": rounds,
        "threads": threads, "same_text": same, "batch_same_text": batch_same,
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(args.rounds, args.max_tokens, args.threads))
