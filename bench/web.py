"""HTTP benchmark: /v1/chat/completions through the whole stack versus a bare server.

    .venv/bin/python bench/web.py [--seconds 4] [--rounds 2] [--levels 1,16,64]

(a) direct: a minimal aiohttp server (its own process) that answers
    `POST /v1/chat/completions` with a fixed completion -- the least code that
    speaks the protocol;
(b) stack: the same request to the web service of `inferswarm up` (one
    gateway, one worker): web -> gateway (key check, limits, accounting,
    metrics) -> worker -> the same fixed server, through the worker's openai
    backend. The inference service has no zero-cost backend (yet), so the
    worker's HTTP call to the fixed server is part of (b): "added" below is
    everything our path adds on top of a bare server, that hop included.
Requests of `max_tokens` 8, the response cache off, the caller on the
unlimited tier; each path is measured plain and streamed (`stream: true`,
timed to the reply's last byte). For each number in flight the four alternate
(never at once) for `rounds` rounds of `seconds` each, after a warm-up; the
best round of each is kept (shared, noisy machines). The load generator is
one aiohttp client with exactly N requests in flight, bounded in time and
count. The last line is JSON with `rps_64`, `p50_ms_64`, `p99_ms_64`,
`added_p50_ms_1`, and for the streamed run `stream_rps_64`, `stream_p50_ms_64`,
`stream_p99_ms_64` (and the bare server's `direct_stream_p50_ms_64`), and the CPU each
service used per answered request of the round kept, in microseconds (`web_cpu_us_64`,
`gateway_cpu_us_64`, `inference_cpu_us_64` -- the worker --, and `stream_...` for the
streamed run): CPU time, not wall time, so less disturbed by the machine's noise. (The issue names this
file bench/http.py; a script of that name would shadow the standard library's
`http` package, which aiohttp imports, so it is bench/web.py.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.config import MeshConfig, Secret  # noqa: E402
from shared.logging import configure_logging  # noqa: E402
from shared.runner import join_mesh  # noqa: E402

MODEL = "bench-model"
PASSWORD = "correct-horse-battery-9"
ADMIN = "bench-admin@example.com"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
STREAMED = {**BODY, "stream": True}
COMPLETION = "Hello! How can I help you today?"
MAX_REQUESTS_PER_RUN = 200_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- (a) the fixed-completion server -------------------------------------------------------


def fixed_app() -> web.Application:
    whole = {"id": "chatcmpl-fixed", "object": "chat.completion", "created": 0, "model": MODEL,
             "choices": [{"index": 0, "message": {"role": "assistant", "content": COMPLETION},
                          "logprobs": None, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}}
    encoded = json.dumps(whole).encode()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=encoded, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        delta = {**whole, "object": "chat.completion.chunk", "usage": None}
        delta["choices"] = [{"index": 0, "delta": {"content": COMPLETION}, "finish_reason": None}]
        await response.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
        end = {**delta, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        if (body.get("stream_options") or {}).get("include_usage"):
            end = {**end, "usage": whole["usage"]}
        await response.write(b"data: " + json.dumps(end).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                               "owned_by": "bench"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def serve_fixed(port: int) -> None:
    web.run_app(fixed_app(), host="127.0.0.1", port=port, print=None, access_log=None, handle_signals=True)


# -- (b) the stack -------------------------------------------------------------------------------


def start_stack(data_dir: Path, fixed_url: str, web_port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({
        "INFERSWARM_MODELS": json.dumps({MODEL: {"backend": "openai", "url": fixed_url, "slots": 256,
                                                 "queue": 256}}),
        "INFERSWARM_CACHE_TTL": "0", "INFERSWARM_LOG_LEVEL": "warning",
        "XDG_CONFIG_HOME": str(data_dir.parent / "config"), "XDG_CACHE_HOME": str(data_dir.parent / "cache"),
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferswarm.cli", "up", "--json", "--data-dir", str(data_dir), "--dht-port", "0",
         "--workers", "1", "--web-port", str(web_port), "--metrics-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=open(data_dir.parent / "up.stderr", "w"), text=True, env=env)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"inferswarm up failed: see {data_dir.parent / 'up.stderr'}")
    proc.ready = json.loads(line)  # type: ignore[attr-defined]
    return proc


async def unlimited_key(base: str, data_dir: Path, bootstrap: str) -> str:
    """Register the caller and an admin (granted by us, a mesh member, as the operator does),
    move the caller to the unlimited tier, make a key."""
    async with aiohttp.ClientSession() as http:
        for name, email in (("bench", "bench@example.com"), ("bench-admin", ADMIN)):
            await http.post(f"{base}/api/auth/register", json={"username": name, "email": email, "password": PASSWORD})
        tokens = {}
        for name in ("bench", "bench-admin"):
            reply = await http.post(f"{base}/api/auth/login", json={"username_or_email": name, "password": PASSWORD})
            tokens[name] = (await reply.json())["token"]
        async with AsyncExitStack() as stack:  # admin actions are RPC only: join the mesh for one call
            secret = (data_dir / "mesh.secret").read_text().strip()
            node = await join_mesh(stack, "bench-client", MeshConfig(
                data_dir=data_dir.parent / "client", bootstrap=(bootstrap,), mesh_secret=Secret(secret)),
                read_only=True)
            await node.mesh("auth").call("auth.grant_admin", {"user": "bench-admin", "reason": "bench"})
            await node.mesh("auth").call("auth.set_tier", {"token": tokens["bench-admin"], "user": "bench",
                                                           "tier": "unlimited"})
        reply = await http.post(f"{base}/api/auth/api-keys", json={"name": "bench"},
                                headers={"Authorization": f"Bearer {tokens['bench']}"})
        return (await reply.json())["api_key"]


# -- the load generator ------------------------------------------------------------------------


async def measure(url: str, headers: dict[str, str], in_flight: int, seconds: float, body: dict = BODY) -> dict:
    """Exactly `in_flight` requests at a time for `seconds`; latencies of the successful ones
    (a streamed reply: until its last byte)."""
    latencies: list[float] = []
    failures = 0
    payload = json.dumps(body).encode()
    connector = aiohttp.TCPConnector(limit=in_flight, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers={**headers, "Content-Type": "application/json"}) as http:
        stop_at = time.perf_counter() + seconds

        async def one_caller() -> None:
            nonlocal failures
            while time.perf_counter() < stop_at and len(latencies) + failures < MAX_REQUESTS_PER_RUN:
                started = time.perf_counter()
                async with http.post(url, data=payload) as reply:
                    await reply.read()
                    if reply.status == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        failures += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_caller() for _ in range(in_flight)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    if not latencies:
        return {"rps": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "failures": failures}
    return {"rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 3),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3),
            "requests": len(latencies), "failures": failures}


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda run: run["rps"])


SERVICES = ("web", "gateway", "inference", "auth", "metrics", "postgres")


def _postgres_cpu(data_dir: Path) -> float:
    """CPU seconds so far of the embedded PostgreSQL under `data_dir` (pg_ctl detaches it from
    `inferswarm up`): its postmaster and the backends alive now."""
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        if "postgres" in line and f"-D {data_dir}" in line:
            try:
                return sum(p.cpu_times().user + p.cpu_times().system for p in [proc, *proc.children()])
            except psutil.Error:
                return 0.0
    return 0.0


def stack_cpu(stack: subprocess.Popen, data_dir: Path) -> dict[str, float]:
    """CPU seconds (user + system) so far of each service process `inferswarm up` started, and
    of its PostgreSQL (backends that ended meanwhile are not counted)."""
    used = dict.fromkeys(SERVICES, 0.0)
    used["postgres"] = _postgres_cpu(data_dir)
    for child in psutil.Process(stack.pid).children(recursive=True):
        try:
            line, times = " ".join(child.cmdline()), child.cpu_times()
        except psutil.Error:
            continue
        for service in SERVICES:
            if f"services.{service}" in line:
                used[service] += times.user + times.system
    return used


async def measured(stack: subprocess.Popen, data_dir: Path, url: str, headers: dict[str, str], in_flight: int, seconds: float,
                   body: dict) -> dict:
    """`measure`, with each service's CPU per answered request (microseconds) in `cpu_us`."""
    before = stack_cpu(stack, data_dir)
    got = await measure(url, headers, in_flight, seconds, body)
    after = stack_cpu(stack, data_dir)
    answered = max(got.get("requests", 0), 1)
    got["cpu_us"] = {name: round((after[name] - before[name]) * 1e6 / answered, 1) for name in SERVICES}
    return got


async def run(seconds: float, rounds: int, levels: list[int]) -> None:
    fixed_port, web_port = free_port(), free_port()
    fixed = multiprocessing.get_context("spawn").Process(target=serve_fixed, args=(fixed_port,), daemon=True)
    fixed.start()
    fixed_url = f"http://127.0.0.1:{fixed_port}/v1"
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        data_dir = Path(tmp) / "data"
        stack = start_stack(data_dir, fixed_url, web_port)
        try:
            base = f"http://127.0.0.1:{web_port}"
            key = await unlimited_key(base, data_dir, stack.ready["bootstrap"])  # type: ignore[attr-defined]
            auth = {"Authorization": f"Bearer {key}"}
            targets = {"direct": (f"{fixed_url}/chat/completions", {}, BODY),
                       "stack": (f"{base}/v1/chat/completions", auth, BODY),
                       "direct_stream": (f"{fixed_url}/chat/completions", {}, STREAMED),
                       "stream": (f"{base}/v1/chat/completions", auth, STREAMED)}
            for url, headers, body in targets.values():  # warm-up: connections, caches, JIT-free paths
                await measure(url, headers, 16, 1.0, body)
            results: dict[str, dict[int, dict]] = {name: {} for name in targets}
            for level in levels:
                runs: dict[str, list[dict]] = {name: [] for name in targets}
                for _ in range(rounds):
                    for name, (url, headers, body) in targets.items():
                        runs[name].append(await measured(stack, data_dir, url, headers, level, seconds, body))
                for name in runs:
                    results[name][level] = best(runs[name])
                print_level(level, results["direct"][level], results["stack"][level])
                print_level(level, results["direct_stream"][level], results["stream"][level], "streamed")
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(timeout=60)
            fixed.terminate()
            fixed.join(10)
    summary = {"bench": "web", "seconds": seconds, "rounds": rounds}
    for level in levels:
        direct, full = results["direct"][level], results["stack"][level]
        summary[f"rps_{level}"] = full["rps"]
        summary[f"p50_ms_{level}"] = full["p50_ms"]
        summary[f"p99_ms_{level}"] = full["p99_ms"]
        summary[f"direct_rps_{level}"] = direct["rps"]
        summary[f"direct_p50_ms_{level}"] = direct["p50_ms"]
        summary[f"added_p50_ms_{level}"] = round(full["p50_ms"] - direct["p50_ms"], 3)
        summary[f"failures_{level}"] = full["failures"] + direct["failures"]
        streamed, direct_streamed = results["stream"][level], results["direct_stream"][level]
        summary[f"stream_rps_{level}"] = streamed["rps"]
        summary[f"stream_p50_ms_{level}"] = streamed["p50_ms"]
        summary[f"stream_p99_ms_{level}"] = streamed["p99_ms"]
        summary[f"direct_stream_p50_ms_{level}"] = direct_streamed["p50_ms"]
        summary[f"stream_failures_{level}"] = streamed["failures"] + direct_streamed["failures"]
        for name in SERVICES[:3]:  # CPU per request of the round kept; "inference" is the worker
            summary[f"{name}_cpu_us_{level}"] = full["cpu_us"][name]
            summary[f"stream_{name}_cpu_us_{level}"] = streamed["cpu_us"][name]
    print(json.dumps(summary))


def print_level(level: int, direct: dict, full: dict, kind: str = "") -> None:
    print(f"in flight {level:>3}{' ' + kind if kind else ''}: direct {direct['rps']:>8.1f} req/s  p50 {direct['p50_ms']:>7.2f} ms  "
          f"p99 {direct['p99_ms']:>7.2f} ms | stack {full['rps']:>8.1f} req/s  p50 {full['p50_ms']:>7.2f} ms  "
          f"p99 {full['p99_ms']:>7.2f} ms | added p50 {full['p50_ms'] - direct['p50_ms']:>6.2f} ms"
          f"{'  (failures: %d)' % full['failures'] if full['failures'] else ''}", flush=True)
    print(f"  stack CPU per request, microseconds: {full['cpu_us']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levels", default="1,16,64")
    args = parser.parse_args()
    configure_logging("warning", "console", service="bench")
    asyncio.run(run(args.seconds, args.rounds, [int(n) for n in args.levels.split(",")]))


if __name__ == "__main__":
    main()
