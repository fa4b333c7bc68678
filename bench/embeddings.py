"""Embeddings benchmark: /v1/embeddings through the whole stack versus the model in-process.

    .venv/bin/python bench/embeddings.py [--seconds 5] [--rounds 2] [--batch 32] [--in-flight 2]

(a) in-process: the local embedding model (all-MiniLM-L6-v2 int8, onnxruntime;
    services/inference/backends/minilm.py) called directly, `batch` texts per
    call, `in-flight` calls at a time, on a slot per call;
(b) stack: the same batches as `POST /v1/embeddings` (base64, as the OpenAI
    SDKs ask by default) to the web service of `inferswarm up` (one gateway,
    one worker serving the same model with the same slots): web -> gateway
    (key check, limits, accounting) -> worker -> the model.
Both use the same CPU threads for the model. They alternate (never at once)
for `rounds` rounds of `seconds` each after a warm-up; the best round of each
is kept (shared, noisy machines). Every run is bounded in time and count.
The last line is JSON with `embeddings_ratio` = stack / in-process
embeddings per second (the issue's target: >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.inference.backends.minilm import LocalEmbedder  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_web", Path(__file__).with_name("web.py"))
assert _spec is not None and _spec.loader is not None
bench_web = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_web)  # free_port, unlimited_key: the web benchmark's

MODEL = "minilm"
MAX_CALLS_PER_RUN = 100_000


def texts(batch: int, round_: int) -> list[str]:
    """Distinct sentences of everyday length (about 12 words)."""
    return [f"Sentence {round_}-{n}: the quick brown fox jumps over {n % 13} lazy dogs near the river."
            for n in range(batch)]


async def in_process(embedder: LocalEmbedder, batch: int, in_flight: int, seconds: float) -> dict:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def caller(index: int) -> None:
        nonlocal done
        calls = 0
        while time.perf_counter() < stop_at and calls < MAX_CALLS_PER_RUN:
            await embedder.embed(texts(batch, index * 1000 + calls), None)
            done += batch
            calls += 1

    began = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(in_flight)))
    return {"per_s": round(done / (time.perf_counter() - began), 1), "embeddings": done}


async def through_stack(url: str, key: str, batch: int, in_flight: int, seconds: float) -> dict:
    done = failures = 0
    stop_at = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as http:

        async def caller(index: int) -> None:
            nonlocal done, failures
            calls = 0
            while time.perf_counter() < stop_at and calls < MAX_CALLS_PER_RUN:
                body = {"model": MODEL, "input": texts(batch, index * 1000 + calls), "encoding_format": "base64"}
                async with http.post(url, json=body) as reply:
                    answer = await reply.json()
                    if reply.status == 200 and len(answer["data"]) == batch:
                        done += batch
                    else:
                        failures += 1
                calls += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(in_flight)))
    return {"per_s": round(done / (time.perf_counter() - began), 1), "embeddings": done, "failures": failures}


def start_stack(data_dir: Path, web_port: int, slots: int, threads: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({
        "INFERSWARM_MODELS": json.dumps({MODEL: {"backend": "local", "kind": "embedding", "slots": slots,
                                                 "n_threads": threads}}),
        "INFERSWARM_LOG_LEVEL": "warning",
        "XDG_CONFIG_HOME": str(data_dir.parent / "config"), "XDG_CACHE_HOME": str(data_dir.parent / "cache"),
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferswarm.cli", "up", "--json", "--data-dir", str(data_dir), "--dht-port", "0",
         "--workers", "1", "--web-port", str(web_port), "--metrics-port", str(bench_web.free_port())],
        stdout=subprocess.PIPE, stderr=open(data_dir.parent / "up.stderr", "w"), text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        raise SystemExit(f"inferswarm up failed: see {data_dir.parent / 'up.stderr'}")
    proc.ready = json.loads(line)  # type: ignore[attr-defined]
    return proc


async def run(seconds: float, rounds: int, batch: int, in_flight: int, threads: int) -> None:
    embedder = LocalEmbedder(slots=in_flight, n_threads=threads)
    await embedder.start()
    web_port = bench_web.free_port()
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as tmp:
        data_dir = Path(tmp) / "data"
        stack = start_stack(data_dir, web_port, in_flight, threads)
        try:
            base = f"http://127.0.0.1:{web_port}"
            key = await bench_web.unlimited_key(base, data_dir, stack.ready["bootstrap"])  # type: ignore[attr-defined]
            url = f"{base}/v1/embeddings"
            await in_process(embedder, batch, in_flight, 1.0)  # warm-up
            await through_stack(url, key, batch, in_flight, 1.0)
            local_runs, stack_runs = [], []
            for _ in range(rounds):
                local_runs.append(await in_process(embedder, batch, in_flight, seconds))
                stack_runs.append(await through_stack(url, key, batch, in_flight, seconds))
                print(f"in-process {local_runs[-1]['per_s']:>8.1f} embeddings/s | stack "
                      f"{stack_runs[-1]['per_s']:>8.1f} embeddings/s"
                      f"{'  (failures: %d)' % stack_runs[-1]['failures'] if stack_runs[-1]['failures'] else ''}",
                      flush=True)
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(timeout=60)
            await embedder.close()
    local = max(run["per_s"] for run in local_runs)
    best = max(stack_runs, key=lambda run: run["per_s"])
    print(json.dumps({"bench": "embeddings", "seconds": seconds, "rounds": rounds, "batch": batch,
                      "in_flight": in_flight, "threads": threads, "in_process_per_s": local,
                      "stack_per_s": best["per_s"], "failures": sum(r["failures"] for r in stack_runs),
                      "embeddings_ratio": round(best["per_s"] / local, 3) if local else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="the model's CPU threads, in-process and in the worker alike")
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.rounds, args.batch, args.in_flight, args.threads))


if __name__ == "__main__":
    main()
