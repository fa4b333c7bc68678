"""Load and soak benchmark: many streaming clients through 2 gateways, for minutes.

    .venv/bin/python bench/load.py [--streams 1000] [--seconds 300] [--warmup 90]
                                   [--baseline 20] [--gateways 2] [--workers 3] [--client-procs 2]

The whole stack as real processes, started by `inferswarm up --json` in a
temporary directory (removed at the end): the DHT bootstrap node, auth,
metrics, web, `--gateways` gateways and `--workers` inference workers serving
`echo`, the zero-cost backend, on PostgreSQL (embedded, or the server of
DATABASE_URL). A user on the "unlimited" tier (moved there by an admin) owns
the API key every client uses, so limits and accounting are on for every
request.

`--streams` streaming calls are kept open all the time, spread over
`--client-procs` client processes (one Python process cannot drive 1,000
streams alone): each of them loops -- open a stream, read every chunk,
again -- until its phase ends. A stream sends a 23-word prompt; the echo
worker sends the words back one chunk at a time, `DELAY` seconds apart, so
an unloaded stream lasts ~1 s and the streams really are open together.

Phases, all with the same clients: `--baseline` seconds straight to the
workers (`inference.generate`, no gateway: what the gateways cost), then
`--warmup` seconds through the gateways (`gateway.infer`, spread over all of
them), then the soak of `--seconds`. A stream counts in the phase in which
it ended. Every error is counted, by code (typed `MeshError`) or class name,
in every phase. The RSS (VmRSS of /proc/PID/status) of every process of the
stack and of the clients is read at the start of the soak, a few times
during it and at its end; `rss_growth` is the largest (end - start) / start
of a server process.

Targets: no error at 1,000 concurrent streams; RSS growth under 10% over the
soak. The last line is JSON with `errors`, `rss_growth`, the soak's
throughput and latency (`streams_per_s`, ...), the direct run's
`direct_streams_per_s` and their `streams_ratio`, and the baseline's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "echo"
DELAY = 0.05  # seconds between the echo worker's chunks
PROMPT = ("the quick brown fox jumps over the lazy dog while seven wise owls "
          "watch from an old oak tree under a pale moon")  # 23 words: 23 chunks, ~1.1 s
MAX_TOKENS = 64
STREAM_TIMEOUT = 60.0  # each stream's deadline, seconds
MAX_STREAMS_PER_LOOP = 1_000_000  # a bound on every client loop, besides time
PASSWORD = "benchmark passphrase, long enough"
ADMIN = "load-admin@example.org"
PHASES = ("direct-warmup", "direct", "warmup", "soak")


# -- the client processes ------------------------------------------------------------


class Tally:
    """What the streams of one client process did, per (path, phase in which they ended)."""

    def __init__(self) -> None:
        self.streams: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.errors: dict[str, Counter[str]] = {}
        self.latency: dict[str, array[float]] = {}
        self.ttft: dict[str, array[float]] = {}
        self.examples: dict[str, list[str]] = {}  # the first few distinct messages of each error code

    def ok(self, key: str, seconds: float, ttft: float, tokens: int) -> None:
        self.streams[key] += 1
        self.tokens[key] += tokens
        self.latency.setdefault(key, array("f")).append(seconds * 1000)
        self.ttft.setdefault(key, array("f")).append(ttft * 1000)

    def error(self, key: str, code: str, message: str) -> None:
        self.errors.setdefault(key, Counter())[code] += 1
        seen = self.examples.setdefault(code, [])
        if len(seen) < 3 and message[:300] not in seen:
            seen.append(message[:300])

    def view(self) -> dict[str, Any]:
        return {"streams": dict(self.streams), "tokens": dict(self.tokens),
                "errors": {k: dict(v) for k, v in self.errors.items()}, "examples": self.examples,
                "latency": {k: [round(x, 1) for x in v] for k, v in self.latency.items()},
                "ttft": {k: [round(x, 1) for x in v] for k, v in self.ttft.items()}}


class Schedule:
    """Phase boundaries, wall-clock seconds shared by every process."""

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds  # start of each phase, then the end of the last

    def phase(self, now: float) -> str | None:
        for name, start, end in zip(PHASES, self.bounds, self.bounds[1:]):
            if start <= now < end:
                return name
        return None if now >= self.bounds[-1] else PHASES[0]


class UnfinishedStream(Exception):
    """A stream ended without its final chunk."""


async def one_stream(connection: Any, method: str, params: dict[str, Any]) -> tuple[float, int]:
    """Read one whole stream: (seconds to the first text, completion tokens)."""
    start = time.monotonic()
    first, tokens = None, None
    stream = await connection.stream(method, params, timeout=STREAM_TIMEOUT)
    async with stream:
        async for chunk in stream:
            if first is None and "text" in chunk:
                first = time.monotonic() - start
            if chunk.get("done"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens is None or first is None:
        raise UnfinishedStream(f"{method}: no text or no final chunk")
    return first, tokens


async def client_loop(index: int, paths: dict[str, tuple[str, list[Any], dict[str, Any]]],
                      schedule: Schedule, tally: Tally) -> None:
    from shared.errors import MeshError

    await asyncio.sleep(random.uniform(0, 1))  # do not open every stream in the same millisecond
    for _ in range(MAX_STREAMS_PER_LOOP):
        phase = schedule.phase(time.time())
        if phase is None:
            return
        path = "direct" if phase.startswith("direct") else "gateway"
        method, connections, params = paths[path]
        began = time.monotonic()
        try:
            ttft, tokens = await one_stream(connections[index % len(connections)], method, params)
        except MeshError as exc:
            tally.error(f"{path}/{schedule.phase(time.time())}", exc.code, str(exc))
            await asyncio.sleep(0.1)  # an error is counted, not hammered
        except Exception as exc:  # every failure counts, whatever it is
            tally.error(f"{path}/{schedule.phase(time.time())}", type(exc).__name__, str(exc))
            await asyncio.sleep(0.1)
        else:
            tally.ok(f"{path}/{schedule.phase(time.time())}", time.monotonic() - began, ttft, tokens)


async def run_client(setup: dict[str, Any]) -> None:
    """One client process: join the mesh, say ready, run the schedule, print the tally."""
    from shared.config import MeshConfig, Secret
    from shared.dht import model_topic, service_topic
    from shared.runner import join_mesh

    async with AsyncExitStack() as stack:
        node = await join_mesh(stack, setup["name"], MeshConfig(
            data_dir=Path(setup["data_dir"]), mesh_secret=Secret(setup["secret"]),
            bootstrap=(setup["bootstrap"],), log_level="warning"), read_only=True)
        gateways = await providers(node, service_topic("gateway"), setup["gateways"])
        workers = await providers(node, model_topic(MODEL), setup["workers"])
        messages = [{"role": "user", "content": PROMPT}]
        paths = {
            "direct": ("inference.generate", [node.mesh.connection(p) for p in workers],
                       {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "priority": "unlimited"}),
            "gateway": ("gateway.infer", [node.mesh.connection(p) for p in gateways],
                        {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "api_key": setup["api_key"]}),
        }
        print(json.dumps({"ready": os.getpid()}), flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return  # the benchmark went away
        schedule = Schedule(json.loads(line)["bounds"])
        tally = Tally()
        first = setup["first_index"]
        await asyncio.gather(*(client_loop(first + i, paths, schedule, tally) for i in range(setup["streams"])))
        print(json.dumps(tally.view()), flush=True)


async def providers(node: Any, topic: str, count: int) -> list[Any]:
    """The providers of `topic` once there are `count` of them (at most 60 s)."""
    found: list[Any] = []
    for _ in range(300):
        try:
            found = await node.discovery.lookup(topic)
        except Exception:
            found = []
        if len(found) >= count:
            return sorted(found, key=lambda p: p.endpoint)
        await asyncio.sleep(0.2)
    raise SystemExit(f"only {len(found)} providers of {topic} after 60 s (wanted {count})")


# -- processes ---------------------------------------------------------------------------


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    """VmRSS of `pid` in MiB; None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of `pid` so far; None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def keep_logs(root: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for log in [*root.glob("*.log"), *(root / "data" / "logs").glob("*.log")]:
        shutil.copy(log, target / log.name)


def stop_process(proc: subprocess.Popen[str], grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Stack:
    """`inferswarm up --json` in `root`; stopped (and every child checked gone) at the end."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.data = root / "data"
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.children: dict[str, int] = {}

    async def start(self) -> dict[str, Any]:
        catalog = {MODEL: {"backend": "echo", "slots": 256, "queue": 1024, "delay": DELAY}}
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
        env.update(INFERSWARM_MODELS=json.dumps(catalog),
                   INFERSWARM_TIER_UNLIMITED_TOKENS_PER_MONTH="none", INFERSWARM_LOG_LEVEL="warning",
                   XDG_CONFIG_HOME=str(self.root / "config"), XDG_CACHE_HOME=str(self.root / "cache"))
        with open(self.root / "up.log", "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inferswarm.cli", "up", "--json", "--data-dir", str(self.data),
                 "--dht-port", str(free_port(socket.SOCK_DGRAM)), "--web-port", str(free_port(socket.SOCK_STREAM)),
                 "--metrics-port", str(free_port(socket.SOCK_STREAM)),
                 "--gateways", str(self.args.gateways), "--workers", str(self.args.workers)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 300)  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"inferswarm up exited early:\n{(self.root / 'up.log').read_text()[-3000:]}")
        ready = json.loads(line)
        self.children = {"up": self.proc.pid, **{c["name"]: c["pid"] for c in ready["children"]}}
        return ready

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 60)
        for pid in self.children.values():  # up was killed before it stopped them: do it here
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


class Clients:
    """The client processes: this script with `--client`, a JSON setup on stdin."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[str]] = []

    async def start(self, setups: list[dict[str, Any]]) -> None:
        for setup in setups:
            with open(self.root / f"{setup['name']}.log", "w") as log:
                proc = subprocess.Popen([sys.executable, __file__, "--client"], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log, text=True)
            self.procs.append(proc)
            proc.stdin.write(json.dumps(setup) + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        for proc, setup in zip(self.procs, setups):
            await self.read(proc, setup["name"], 120)

    def go(self, bounds: list[float]) -> None:
        for proc in self.procs:
            proc.stdin.write(json.dumps({"bounds": bounds}) + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]

    async def results(self, timeout: float) -> list[dict[str, Any]]:
        return [await self.read(proc, f"client-{i}", timeout) for i, proc in enumerate(self.procs)]

    async def read(self, proc: subprocess.Popen[str], name: str, timeout: float) -> dict[str, Any]:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"{name} failed:\n{(self.root / f'{name}.log').read_text()[-3000:]}")
        return json.loads(line)

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, 10)


# -- the run --------------------------------------------------------------------------------


async def prepare_user(auth: Any) -> str:
    """An admin (granted by us, a mesh member, as the operator does), and a user moved to the
    "unlimited" tier; the user's API key."""
    for name, email in (("loadadmin", ADMIN), ("loaduser", "load-user@example.org")):
        await auth.call("auth.register", {"username": name, "email": email, "password": PASSWORD})
    await auth.call("auth.grant_admin", {"user": "loadadmin", "reason": "bench"})
    admin = (await auth.call("auth.login", {"username_or_email": "loadadmin", "password": PASSWORD}))["token"]
    await auth.call("auth.set_tier", {"token": admin, "user": "loaduser", "tier": "unlimited"})
    user = (await auth.call("auth.login", {"username_or_email": "loaduser", "password": PASSWORD}))["token"]
    return (await auth.call("auth.create_key", {"token": user, "name": "load"}))["api_key"]


async def gateways_in_flight(node: Any, gateways: list[Any]) -> int | None:
    """Requests in flight on every gateway together (`gateway.health`)."""
    try:
        healths = await asyncio.gather(*(node.mesh.connection(p).call("gateway.health", timeout=10) for p in gateways))
    except Exception:
        return None
    return sum(h["in_flight"] for h in healths)


async def soak_samples(node: Any, gateways: list[Any], pids: dict[str, int], bounds: list[float],
                       count: int) -> list[dict[str, Any]]:
    """RSS of every process (and the gateways' in-flight requests) at the soak's start, end and between."""
    start, end = bounds[-2], bounds[-1]
    samples = []
    for at in [start + (end - start) * i / count for i in range(count + 1)]:
        await asyncio.sleep(max(0.0, at - time.time()))
        in_flight = await gateways_in_flight(node, gateways)
        samples.append({"t": round(time.time() - start), "in_flight": in_flight,
                        "rss": {name: rss_mib(pid) for name, pid in pids.items()},
                        "cpu": {name: cpu_seconds(pid) for name, pid in pids.items()}})
    return samples


async def main(args: argparse.Namespace) -> None:
    from shared.config import MeshConfig, Secret
    from shared.dht import model_topic, service_topic
    from shared.runner import join_mesh

    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):  # stop everything started, then exit
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        root = Path(tmp)
        async with AsyncExitStack() as stack:
            up = Stack(root, args)
            if args.logs is not None:  # runs last: after every process stopped
                stack.callback(keep_logs, root, args.logs)
            stack.callback(up.stop)
            ready = await up.start()
            secret = (up.data / "mesh.secret").read_text().strip()
            node = await join_mesh(stack, "load", MeshConfig(
                data_dir=root / "bench", mesh_secret=Secret(secret), bootstrap=(ready["bootstrap"],),
                log_level="warning"), read_only=True)
            gateways = await providers(node, service_topic("gateway"), args.gateways)
            await providers(node, model_topic(MODEL), args.workers)
            api_key = await prepare_user(node.mesh("auth"))

            clients = Clients(root)
            stack.callback(clients.stop)
            shares = [args.streams // args.client_procs + (i < args.streams % args.client_procs)
                      for i in range(args.client_procs)]
            await clients.start([
                {"name": f"client-{i}", "data_dir": str(root / "clients"), "secret": secret,
                 "bootstrap": ready["bootstrap"], "api_key": api_key, "streams": share,
                 "first_index": sum(shares[:i]), "gateways": args.gateways, "workers": args.workers}
                for i, share in enumerate(shares)])
            begin = time.time() + 1
            lengths = (min(5.0, args.baseline / 4), args.baseline, args.warmup, args.seconds)
            bounds = [begin + sum(lengths[:i]) for i in range(len(lengths) + 1)]
            clients.go(bounds)
            print(f"running: {args.baseline:.0f} s direct, {args.warmup:.0f} s warm-up, "
                  f"{args.seconds:.0f} s soak ...", file=sys.stderr, flush=True)
            pids = {**up.children, **{f"client-{i}": p.pid for i, p in enumerate(clients.procs)}}
            samples = await soak_samples(node, gateways, pids, bounds, args.samples)
            results = await clients.results(STREAM_TIMEOUT + 60)
            report(args, merge(results), samples, set(up.children))


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"streams": Counter(), "tokens": Counter(), "errors": {}, "latency": {}, "ttft": {},
                             "examples": {}}
    for result in results:
        for code, messages in result["examples"].items():
            seen = total["examples"].setdefault(code, [])
            seen.extend(m for m in messages if m not in seen and len(seen) < 3)
        total["streams"].update(result["streams"])
        total["tokens"].update(result["tokens"])
        for key, codes in result["errors"].items():
            total["errors"].setdefault(key, Counter()).update(codes)
        for field in ("latency", "ttft"):
            for key, values in result[field].items():
                total[field].setdefault(key, []).extend(values)
    return total


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def figures(total: dict[str, Any], key: str, seconds: float) -> dict[str, Any]:
    latency, ttft = total["latency"].get(key, []), total["ttft"].get(key, [])
    return {
        "seconds": seconds,
        "streams": total["streams"][key],
        "streams_per_s": round(total["streams"][key] / seconds, 1),
        "tokens_per_s": round(total["tokens"][key] / seconds, 1),
        "p50_ms": percentile(latency, 0.50), "p99_ms": percentile(latency, 0.99),
        "ttft_p50_ms": percentile(ttft, 0.50), "ttft_p99_ms": percentile(ttft, 0.99),
        "errors": sum(total["errors"].get(key, {}).values()),
    }


def report(args: argparse.Namespace, total: dict[str, Any], samples: list[dict[str, Any]],
           servers: set[str]) -> None:
    direct = figures(total, "direct/direct", args.baseline)
    soak = figures(total, "gateway/soak", args.seconds)
    print(f"load: {args.streams} concurrent streams from {args.client_procs} client processes; "
          f"{args.gateways} gateways, {args.workers} echo workers (256 slots each)")
    print(f"each stream: a {len(PROMPT.split())}-word prompt echoed back as {len(PROMPT.split())} chunks "
          f"{DELAY} s apart (~{(len(PROMPT.split()) - 1) * DELAY:.2f} s unloaded); stream deadline {STREAM_TIMEOUT:.0f} s")
    print(f"\n{'path':<28} {'s':>5} {'streams':>8} {'streams/s':>9} {'tokens/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'errors':>6}")
    for label, f in (("direct to workers (base)", direct), ("through the gateways (soak)", soak)):
        print(f"{label:<28} {f['seconds']:>5.0f} {f['streams']:>8} {f['streams_per_s']:>9.1f} "
              f"{f['tokens_per_s']:>9.0f} {fmt(f['p50_ms']):>8} {fmt(f['p99_ms']):>8} "
              f"{fmt(f['ttft_p50_ms']):>9} {fmt(f['ttft_p99_ms']):>9} {f['errors']:>6}")
    if direct["p50_ms"] and soak["p50_ms"]:
        print(f"gateways' cost: {soak['streams_per_s'] / direct['streams_per_s']:.2f}x the direct throughput, "
              f"p50 +{soak['p50_ms'] - direct['p50_ms']:.0f} ms, TTFT p50 +{soak['ttft_p50_ms'] - direct['ttft_p50_ms']:.1f} ms")
    errors = {key: dict(codes) for key, codes in sorted(total["errors"].items())}
    error_count = sum(sum(codes.values()) for codes in errors.values())
    print(f"\nerrors (path/phase: code: count), every phase: {errors or 'none'}")
    for code, messages in sorted(total["examples"].items()):
        print(f"  {code}, e.g.: " + " | ".join(messages))

    names = list(samples[0]["rss"])
    print(f"\nRSS MiB during the soak ({len(samples) - 1} intervals), CPU over the soak (200% = both cores); in flight = gateway.health in_flight, summed")
    print(f"{'process':<14}" + "".join(f"{'t=' + str(s['t']):>8}" for s in samples)
          + f"{'growth':>9}{'CPU %':>7}")
    growth: dict[str, float | None] = {}
    for name in names:
        start, end = samples[0]["rss"][name], samples[-1]["rss"][name]
        growth[name] = (end - start) / start if start and end else None
        cpu = None
        if samples[0]["cpu"][name] is not None and samples[-1]["cpu"][name] is not None:
            cpu = (samples[-1]["cpu"][name] - samples[0]["cpu"][name]) / args.seconds * 100
        print(f"{name:<14}" + "".join(f"{fmt(s['rss'][name]):>8}" for s in samples)
              + f"{fmt_pct(growth[name]):>9}{fmt(cpu):>7}")
    print(f"{'in flight':<14}" + "".join(f"{fmt(s['in_flight']):>8}" for s in samples))
    server_growth = {n: g for n, g in growth.items() if n in servers}
    gone = [n for n, g in server_growth.items() if g is None]
    worst = max((n for n in server_growth if server_growth[n] is not None), key=lambda n: server_growth[n],
                default=None)
    rss_growth = server_growth[worst] if worst is not None else None
    if gone:
        print(f"processes gone (crashed and restarted?): {', '.join(gone)}")
    print(f"\ntargets: errors == 0 at {args.streams} streams (got {error_count}); "
          f"rss_growth < 10% (got {fmt_pct(rss_growth)}, {worst})")
    summary = {
        "errors": error_count,
        "rss_growth": round(rss_growth, 4) if rss_growth is not None else None,
        "rss_growth_process": worst,
        "streams": args.streams,
        "seconds": args.seconds,
        "streams_per_s": soak["streams_per_s"],
        "direct_streams_per_s": direct["streams_per_s"],  # the same clients straight to the workers
        "streams_ratio": round(soak["streams_per_s"] / direct["streams_per_s"], 3) if direct["streams_per_s"] else None,
        "tokens_per_s": soak["tokens_per_s"],
        "p50_ms": soak["p50_ms"], "p99_ms": soak["p99_ms"],
        "ttft_p50_ms": soak["ttft_p50_ms"], "ttft_p99_ms": soak["ttft_p99_ms"],
        "errors_by_code": errors,
        "processes_gone": gone,
        "rss_mb": {n: [samples[0]["rss"][n], samples[-1]["rss"][n]] for n in names},
        "baseline": {k: direct[k] for k in ("streams_per_s", "tokens_per_s", "p50_ms", "p99_ms",
                                             "ttft_p50_ms", "ttft_p99_ms", "errors")},
    }
    print(json.dumps(summary, default=lambda x: round(x, 1)))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def fmt_pct(value: float | None) -> str:
    return "gone" if value is None else f"{value:+.1%}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams (1000)")
    parser.add_argument("--seconds", type=float, default=300.0, help="soak length through the gateways (300)")
    parser.add_argument("--warmup", type=float, default=90.0,
                        help="through the gateways before the soak, so the heaps reach their working size (90)")
    parser.add_argument("--baseline", type=float, default=20.0, help="straight to the workers, first (20)")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--client-procs", type=int, default=2, help="client processes sharing the streams (2)")
    parser.add_argument("--samples", type=int, default=5, help="RSS intervals over the soak (5)")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep every process's log there")
    args = parser.parse_args()
    if not args.client and min(args.streams, args.gateways, args.workers, args.client_procs, args.samples) < 1:
        parser.error("--streams, --gateways, --workers, --client-procs and --samples must be at least 1")
    return args


if __name__ == "__main__":
    from shared.logging import configure_logging

    arguments = parse_args()
    configure_logging("warning", "console")  # stdout carries the clients' JSON lines
    if arguments.client:
        asyncio.run(run_client(json.loads(sys.stdin.readline())))
    else:
        try:
            asyncio.run(main(arguments))
        except (asyncio.CancelledError, KeyboardInterrupt):
            sys.exit("load: interrupted; every process it started is stopped")
