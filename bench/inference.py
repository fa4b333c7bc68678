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


async def run_rpc(client, max_tokens: int) -> dict:
    params = {"model": "smollm2", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.0, "seed": SEED}
    started = time.perf_counter()
    first, pieces, final = None, [], {}
    stream = await client.mesh.topic(model_topic("smollm2")).stream("inference.generate", params, timeout=120)
    async for chunk in stream:
        if "text" in chunk:
            first = first or time.perf_counter()
            pieces.append(chunk["text"])
        else:
            final = chunk
    return {"seconds": time.perf_counter() - started, "ttft": (first or started) - started,
            "text": "".join(pieces), "tokens": final["usage"]["completion_tokens"], "worker": final["timing"]}


def start_worker(data_dir: Path, secret: str, seed: str, threads: int) -> subprocess.Popen:
    models = {"smollm2": {"backend": "local", "slots": 1, "n_threads": threads}}
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
                await run_rpc(client, 8)  # warm up both paths
                run_direct(llm, 8)
                direct, rpc = [], []
                for _ in range(rounds):
                    direct.append(run_direct(llm, max_tokens))
                    rpc.append(await run_rpc(client, max_tokens))
                worker_rss = rss_mb(worker.pid)
            finally:
                worker.send_signal(signal.SIGTERM)
                await asyncio.to_thread(worker.wait, 30)
    tokens = rpc[0]["tokens"]
    same = all(r["text"] == direct[0]["text"] for r in direct + rpc)
    d, r = summary(direct, tokens), summary(rpc, tokens)
    print(f"SmolLM2-135M-Instruct, {threads} threads, {tokens} completion tokens, {rounds} rounds, "
          f"same text on both paths: {same}")
    print(f"{'path':>8} | {'best tok/s':>10} {'median tok/s':>12} | {'best ttft ms':>12} {'median ttft ms':>14}")
    for name, s in (("direct", d), ("rpc", r)):
        print(f"{name:>8} | {s['best']:>10.1f} {s['median']:>12.1f} | {s['ttft_best_ms']:>12.1f} "
              f"{s['ttft_median_ms']:>14.1f}")
    print(f"worker RSS {worker_rss:.0f} MB; this process (model loaded) {rss_mb(os.getpid()):.0f} MB")
    print(json.dumps({
        "tokens_per_s_direct": round(d["best"], 1), "tokens_per_s_rpc": round(r["best"], 1),
        "tokens_per_s_ratio": round(r["best"] / d["best"], 3),
        "tokens_per_s_ratio_median": round(r["median"] / d["median"], 3),
        "ttft_ms_direct": round(d["ttft_best_ms"], 1), "ttft_ms_rpc": round(r["ttft_best_ms"], 1),
        "worker_rss_mb": round(worker_rss, 1), "completion_tokens": tokens, "rounds": rounds,
        "threads": threads, "same_text": same,
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
