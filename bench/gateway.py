"""Gateway benchmark: caller -> gateway -> worker against caller -> worker, in one run.

    .venv/bin/python bench/gateway.py [--seconds 2] [--rounds 2]

Real processes on loopback, as in production: a DHT seed and the caller in
this process; `python -m services.auth` and `python -m services.gateway` on a
real PostgreSQL (the embedded server in a temporary directory, or the server
of DATABASE_URL); one `python -m services.inference` worker serving the
zero-cost `echo` backend (the message's two words back at once; cache off). The caller's tier has limits on requests per hour and tokens per
month, so every gateway request is authenticated (cached key), admitted from
a lease, journaled twice (admitted, done) and shipped to auth -- limits and
accounting are on. Each request is a whole stream: a text chunk, the final
chunk, the end.

At 1, 16 and 64 requests in flight, for the direct path, the gateway path
and the gateway path with money budgets on (the model priced, the caller's
key with a monthly budget: each request reserves its worst-case cost and
settles its cost, and its receipt carries it) -- rounds alternate, the best
round of each is kept: p50/p99 latency and requests/s; the gateway's
overhead is the difference of the p50s. The gateway's RSS is read at the end.
The last line is JSON with `added_p50_ms_1` and `rps_64` (the gateway path),
`tracing_added_p50_ms_1` (see Traces below),
`budget_added_p50_ms_1`, `budget_rps_64` and `budget_overhead_ratio_1` (added
p50 with budgets / without, at 1 in flight), and `chain_added_p50_ms_1`: at 1
in flight, the p50 of requests naming an alias whose chain has a fallback and
a first-token time (the fallback machinery armed; nothing fails) less that of
requests naming the model.

The floor: a third path goes through bench/relay_floor.py, a process that
only relays (a server to the caller, a client to the worker, chunks passed
unchanged: no key, limits, journal, receipt or metrics). `relay_rps_64`,
`relay_ratio_64` (its req/s over the direct path's) and `relay_cpu_us_64` say
how close to direct any gateway on this RPC layer can come on this machine;
the gateway's own work is the difference between it and the relay.

Traces: a second gateway and worker (the worker serving the model under
another name, TRACED_MODEL) run with OTEL_EXPORTER_OTLP_ENDPOINT set, exporting
their spans to an OTLP/HTTP receiver in this process (tests/otlp_receiver.py,
on a thread of its own); the first pair runs with tracing off, as by default.
`tracing_added_p50_ms_1` is, at 1 in flight, the p50 through the traced pair
less that through the untraced one: what tracing on costs a request. The two
are measured side by side, in turn (in alternating order, twice a round), and
the best p50 of each is kept: drift of this noisy machine falls on both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the OTLP receiver

LEVELS = (1, 16, 64)
MODEL = "bench"
TRACED_MODEL = "bench-traced"  #: served by the traced worker only
ALIAS = "bench-chain"  #: an alias: MODEL, then a fallback (nothing fails: the machinery's cost alone)
MESSAGES = [{"role": "user", "content": "Say hello."}]
PASSWORD = "benchmark passphrase, long enough"
ADMIN = "bench-admin@example.org"
RELAY_TOPIC = "bench/relay"  #: bench/relay_floor.py's


# -- processes -----------------------------------------------------------------------


class Children:
    """Child processes of this run, stopped with SIGTERM at the end."""

    def __init__(self, root: Path, base_env: dict[str, str]) -> None:
        self.root = root
        self.base_env = base_env
        self.procs: dict[str, subprocess.Popen[str]] = {}

    async def start(self, name: str, argv: list[str], **env: str) -> dict[str, Any]:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(argv, cwd=ROOT, env={**self.base_env, **env}, stdout=subprocess.PIPE,
                                stderr=log, text=True)
        log.close()
        self.procs[name] = proc
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"{name} did not start:\n{(self.root / f'{name}.log').read_text()[-3000:]}")
        return json.loads(line)

    def cpu_s(self, name: str) -> float:
        """CPU seconds (user and system) the child has used."""
        import psutil

        times = psutil.Process(self.procs[name].pid).cpu_times()
        return float(times.user + times.system)

    def rss_mb(self, name: str) -> float:
        import psutil

        return psutil.Process(self.procs[name].pid).memory_info().rss / 2**20

    async def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- measuring --------------------------------------------------------------------------


async def measure(call: Callable[[], Awaitable[None]], in_flight: int, seconds: float,
                  cpu: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """Latencies and requests/s; with `cpu` (CPU seconds used so far, per process), also
    each process's CPU microseconds per request: unlike req/s, little moved by what else
    runs on the machine."""
    for _ in range(100):  # warm up
        await call()
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    before = cpu() if cpu else {}
    began = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(in_flight)))
    elapsed = time.perf_counter() - began
    after = cpu() if cpu else {}
    latencies.sort()
    result: dict[str, Any] = {
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
    }
    if cpu:
        result["cpu_us"] = {name: round((after[name] - before[name]) / len(latencies) * 1e6, 1) for name in after}
    return result


def streamer(connection: Any, method: str, params: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        stream = await connection.stream(method, params, timeout=30.0)
        chunks = [chunk async for chunk in stream]
        if not chunks or not chunks[-1].get("done"):
            raise RuntimeError(f"{method}: no final chunk")

    return call


def best(rounds: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    return {level: max((r[level] for r in rounds), key=lambda m: m["rps"]) for level in LEVELS}


# -- the run ------------------------------------------------------------------------------


async def prepare_user(auth: Any) -> tuple[str, str]:
    """An admin (granted by us, a mesh member, as the operator does), and a user moved to a
    tier with large limits; the user's API key, and one with a monthly money budget (and
    a price for the model: set by us, the operator)."""
    for name, email in (("benchadmin", ADMIN), ("benchuser", "bench-user@example.org")):
        await auth.call("auth.register", {"username": name, "email": email, "password": PASSWORD})
    await auth.call("auth.grant_admin", {"user": "benchadmin", "reason": "bench"})
    admin = (await auth.call("auth.login", {"username_or_email": "benchadmin", "password": PASSWORD}))["token"]
    await auth.call("auth.set_tier", {"token": admin, "user": "benchuser", "tier": "unlimited"})
    user = (await auth.call("auth.login", {"username_or_email": "benchuser", "password": PASSWORD}))["token"]
    await auth.call("auth.set_price", {"model": MODEL, "input": "0.15", "output": "0.6"})
    plain = (await auth.call("auth.create_key", {"token": user, "name": "bench"}))["api_key"]
    budgeted = await auth.call("auth.create_key", {"token": user, "name": "bench-budget",
                                                   "limits": {"spend_per_month": "1000000"}})
    return plain, budgeted["api_key"]


async def main(seconds: float, rounds: int) -> None:
    from otlp_receiver import OtlpReceiver, in_thread

    with in_thread(OtlpReceiver()) as receiver:
        await run(seconds, rounds, receiver)


async def bench_databases(stack: AsyncExitStack, root: Path) -> tuple[str, str, str]:
    """The server of DATABASE_URL, or an embedded one under `root` (stopped by `stack`), and
    fresh auth and gateway databases on it: (server URL, auth DSN, gateway DSN)."""
    from shared.db import EmbeddedPostgres, ensure_database

    url = os.environ.get("DATABASE_URL")
    if url is None:
        pg = await stack.enter_async_context(EmbeddedPostgres(root / "pgdata", cleanup_mode="delete"))
        url = pg.dsn
    suffix = secrets.token_hex(4)
    return (url, await ensure_database(url, f"bench_auth_{suffix}"),
            await ensure_database(url, f"bench_gateway_{suffix}"))


async def run(seconds: float, rounds: int, receiver: Any) -> None:
    from shared.config import MeshConfig, Secret
    from shared.dht import model_topic, service_topic
    from shared.identity import MeshCredential
    from shared.runner import join_mesh

    secret = MeshCredential.new_secret().hex()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        root = Path(tmp)
        async with AsyncExitStack() as stack:
            url, auth_dsn, gateway_dsn = await bench_databases(stack, root)
            client = await join_mesh(stack, "caller", MeshConfig(
                data_dir=root / "caller", mesh_secret=Secret(secret), record_ttl=30.0))
            base = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_") and k != "DATABASE_URL"}
            base.update(INFERSWARM_MESH_SECRET=secret, INFERSWARM_BOOTSTRAP=client.discovery.address,
                        INFERSWARM_LOG_LEVEL="warning", PYTHONHASHSEED="0")
            children = Children(root, base)
            stack.push_async_callback(children.stop)
            traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
            echo = {"backend": "echo", "slots": 256, "queue": 1024}
            started = await asyncio.gather(
                children.start("auth", [sys.executable, "-m", "services.auth"], DATABASE_URL=auth_dsn,
                               INFERSWARM_DATA_DIR=str(root / "auth"),
                               INFERSWARM_TIER_UNLIMITED_TOKENS_PER_MONTH="100000000000"),
                children.start("worker", [sys.executable, "-m", "services.inference"],
                               INFERSWARM_DATA_DIR=str(root / "worker"), INFERSWARM_CACHE_TTL="0",
                               INFERSWARM_MODELS=json.dumps({MODEL: {"backend": "echo", "slots": 256, "queue": 1024}})),
                children.start("gateway", [sys.executable, "-m", "services.gateway"], DATABASE_URL=gateway_dsn,
                               INFERSWARM_DATA_DIR=str(root / "gateway")),
                children.start("worker-traced", [sys.executable, "-m", "services.inference"],
                               INFERSWARM_DATA_DIR=str(root / "worker-traced"), INFERSWARM_CACHE_TTL="0",
                               INFERSWARM_MODELS=json.dumps({TRACED_MODEL: echo}), **traced),
                children.start("gateway-traced", [sys.executable, "-m", "services.gateway"],
                               DATABASE_URL=gateway_dsn, INFERSWARM_DATA_DIR=str(root / "gateway-traced"), **traced),
                children.start("relay", [sys.executable, str(ROOT / "bench" / "relay_floor.py")],
                               INFERSWARM_DATA_DIR=str(root / "relay")),
            )
            await find(client.discovery, service_topic("auth"))
            gateways = {p.endpoint: p for p in await find(client.discovery, service_topic("gateway"), 2)}
            api_key, budget_key = await prepare_user(client.mesh("auth"))
            worker = client.mesh.connection((await find(client.discovery, model_topic(MODEL)))[0])
            gateway = client.mesh.connection(gateways[started[2]["endpoint"]])
            traced_gateway = client.mesh.connection(gateways[started[4]["endpoint"]])
            relay = client.mesh.connection((await find(client.discovery, RELAY_TOPIC))[0])
            params = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16}
            direct = streamer(worker, "inference.generate", params)
            relayed = streamer(relay, "relay.infer", params)
            through = streamer(gateway, "gateway.infer", {**params, "api_key": api_key})
            budgeted = streamer(gateway, "gateway.infer", {**params, "api_key": budget_key})
            final = [c async for c in await gateway.stream("gateway.infer", {**params, "api_key": api_key})][-1]
            assert final["rate_limit"]["requests_per_hour"]["limit"] == 1_000_000, final
            assert final["rate_limit"]["tokens_per_month"]["limit"] is not None, final
            await until_budgeted(gateway, {**params, "api_key": budget_key})
            chained = streamer(gateway, "gateway.infer", {**params, "model": ALIAS, "api_key": api_key})
            await until_aliased(client.mesh("auth"), gateway, {**params, "model": ALIAS, "api_key": api_key})
            traced_params = {**params, "model": TRACED_MODEL, "api_key": api_key}
            traced = streamer(traced_gateway, "gateway.infer", traced_params)
            await until_served(traced_gateway, traced_params)

            direct_rounds, gateway_rounds, budget_rounds, chain_rounds, relay_rounds = [], [], [], [], []
            tracing: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
            def cpu() -> dict[str, float]:
                return {"caller": time.process_time(), "gateway": children.cpu_s("gateway"),
                        "worker": children.cpu_s("worker"), "auth": children.cpu_s("auth"),
                        "relay": children.cpu_s("relay")}

            for _ in range(rounds):
                direct_rounds.append({level: await measure(direct, level, seconds, cpu) for level in LEVELS})
                gateway_rounds.append({level: await measure(through, level, seconds, cpu) for level in LEVELS})
                relay_rounds.append({level: await measure(relayed, level, seconds, cpu) for level in LEVELS})
                budget_rounds.append({level: await measure(budgeted, level, seconds) for level in LEVELS})
                chain_rounds.append({1: await measure(chained, 1, seconds)})
                for order in (("off", "on"), ("on", "off")):
                    for name in order:
                        tracing[name].append(await measure(traced if name == "on" else through, 1, seconds))
            rss = children.rss_mb("gateway")
            health = await gateway.call("gateway.health")
            chain_1 = max((r[1] for r in chain_rounds), key=lambda m: m["rps"])
            off_1, on_1 = (min(tracing[name], key=lambda m: m["p50_ms"]) for name in ("off", "on"))
            spans = await until_exported(receiver)
            report(best(direct_rounds), best(gateway_rounds), best(budget_rounds), chain_1, rss, health,
                   (off_1, on_1, spans), best(relay_rounds))


async def find(discovery: Any, topic: str, count: int = 1) -> list[Any]:
    """The providers of `topic` once there are `count`."""
    for _ in range(200):
        try:
            found = await discovery.lookup(topic)
            if len(found) >= count:
                return found
        except Exception:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"fewer than {count} providers of {topic}")


async def until_served(gateway: Any, params: dict[str, Any]) -> None:
    """Wait for the gateway to route the model (it learns the workers' models from the DHT)."""
    from shared.errors import NotFound, Unavailable

    for _ in range(100):
        try:
            [c async for c in await gateway.stream("gateway.infer", params)]
            return
        except (NotFound, Unavailable):
            await asyncio.sleep(0.1)
    raise SystemExit(f"the gateway never served {params['model']}")


async def until_exported(receiver: Any) -> int:
    """The spans the traced processes exported (they batch every 5 s): proof tracing was on."""
    for _ in range(100):
        if receiver.spans:
            return len(receiver.spans)
        await asyncio.sleep(0.1)
    raise SystemExit("the traced gateway and worker exported no spans")


async def until_aliased(auth: Any, gateway: Any, params: dict[str, Any]) -> None:
    """Make the alias (the model, then a fallback nobody serves; a first-token time: the
    fallback machinery armed) and wait for the gateway to apply it (it polls each second)."""
    from shared.errors import NotFound

    await auth.call("auth.set_settings", {"settings": {"aliases": {ALIAS: [MODEL, "bench-fallback"]},
                                                       "first_token_timeout": 30}})
    for _ in range(100):
        try:
            final = [c async for c in await gateway.stream("gateway.infer", params)][-1]
        except NotFound:
            await asyncio.sleep(0.1)
            continue
        if final["model"] == MODEL and "tried" not in final:
            return
    raise SystemExit("the gateway never applied the alias")


async def until_budgeted(gateway: Any, params: dict[str, Any]) -> None:
    """Wait for the gateway to know the price (it polls auth each second): a request's
    final chunk then has a cost and the budget counter a limit."""
    from shared.errors import Unavailable

    final: dict[str, Any] = {}
    for _ in range(100):
        try:  # a gateway that has not reached auth yet refuses budgeted requests (retry_safe)
            final = [c async for c in await gateway.stream("gateway.infer", params)][-1]
        except Unavailable:
            await asyncio.sleep(0.1)
            continue
        spend = final["rate_limit"]["spend_per_month"]
        if spend["limit"] is not None and spend["remaining"] != spend["limit"]:
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"the gateway never charged the budget: {final}")


def report(direct: dict[int, dict[str, float]], through: dict[int, dict[str, float]],
           budgeted: dict[int, dict[str, float]], chain_1: dict[str, float], rss: float,
           health: dict[str, Any], traces: tuple[dict[str, float], dict[str, float], int],
           relayed: dict[int, dict[str, float]]) -> None:
    print(f"{'in flight':>9} | {'direct p50 ms':>13} {'p99 ms':>7} {'req/s':>7} | "
          f"{'gateway p50 ms':>14} {'p99 ms':>7} {'req/s':>7} | {'added p50 ms':>12} {'added p99 ms':>12} | "
          f"{'budgets p50 ms':>14} {'req/s':>7} {'added p50 ms':>12}")
    for level in LEVELS:
        d, g, b = direct[level], through[level], budgeted[level]
        print(f"{level:>9} | {d['p50_ms']:>13.3f} {d['p99_ms']:>7.3f} {d['rps']:>7.0f} | "
              f"{g['p50_ms']:>14.3f} {g['p99_ms']:>7.3f} {g['rps']:>7.0f} | "
              f"{g['p50_ms'] - d['p50_ms']:>12.3f} {g['p99_ms'] - d['p99_ms']:>12.3f} | "
              f"{b['p50_ms']:>14.3f} {b['rps']:>7.0f} {b['p50_ms'] - d['p50_ms']:>12.3f}")
    print(f"through an alias with a fallback armed, 1 in flight: p50 {chain_1['p50_ms']:.3f} ms "
          f"({chain_1['p50_ms'] - through[1]['p50_ms']:+.3f} ms against the model named)")
    off_1, on_1, spans = traces
    print(f"tracing on (OTLP/HTTP to a local receiver, {spans} spans received), 1 in flight: "
          f"p50 {on_1['p50_ms']:.3f} ms, p99 {on_1['p99_ms']:.3f} ms; off, measured beside it: "
          f"p50 {off_1['p50_ms']:.3f} ms, p99 {off_1['p99_ms']:.3f} ms; "
          f"added p50 {on_1['p50_ms'] - off_1['p50_ms']:+.3f} ms")
    print("CPU per request at 64 in flight, microseconds: direct", direct[64]["cpu_us"],
          "| through the gateway", through[64]["cpu_us"], "| through the bare relay", relayed[64]["cpu_us"])
    print("the bare relay (bench/relay_floor.py: a gateway's RPC work alone), req/s at 1 / 16 / 64 in flight: "
          + " / ".join(f"{relayed[level]['rps']:.0f}" for level in LEVELS)
          + f"; at 64, {relayed[64]['rps'] / direct[64]['rps']:.2f}x direct, the gateway "
          f"{through[64]['rps'] / direct[64]['rps']:.2f}x; added p50 at 1 {relayed[1]['p50_ms'] - direct[1]['p50_ms']:.3f} ms")
    print(f"gateway RSS {rss:.0f} MiB; usage records shipped {health['usage_shipped']}, "
          f"waiting {health['usage_unshipped']}")
    summary = {
        "added_p50_ms_1": round(through[1]["p50_ms"] - direct[1]["p50_ms"], 3),
        "added_p99_ms_1": round(through[1]["p99_ms"] - direct[1]["p99_ms"], 3),
        "rps_64": round(through[64]["rps"]),
        "direct_rps_64": round(direct[64]["rps"]),
        "budget_added_p50_ms_1": round(budgeted[1]["p50_ms"] - direct[1]["p50_ms"], 3),
        "budget_rps_64": round(budgeted[64]["rps"]),
        "budget_overhead_ratio_1": round((budgeted[1]["p50_ms"] - direct[1]["p50_ms"])
                                         / max(1e-9, through[1]["p50_ms"] - direct[1]["p50_ms"]), 3),
        "chain_added_p50_ms_1": round(chain_1["p50_ms"] - through[1]["p50_ms"], 3),
        "tracing_added_p50_ms_1": round(on_1["p50_ms"] - off_1["p50_ms"], 3),
        "gateway_rss_mb": round(rss, 1),
        "gateway_cpu_us_64": through[64]["cpu_us"]["gateway"],
        "worker_cpu_us_64": through[64]["cpu_us"]["worker"],
        "direct_worker_cpu_us_64": direct[64]["cpu_us"]["worker"],
        "caller_cpu_us_64": through[64]["cpu_us"]["caller"],
        "direct_caller_cpu_us_64": direct[64]["cpu_us"]["caller"],
        "relay_rps_64": round(relayed[64]["rps"]),
        "relay_ratio_64": round(relayed[64]["rps"] / direct[64]["rps"], 3),
        "relay_cpu_us_64": relayed[64]["cpu_us"]["relay"],
        "relay_worker_cpu_us_64": relayed[64]["cpu_us"]["worker"],
        "gateway": {str(k): {m: round(v, 3) for m, v in through[k].items() if m != "cpu_us"} for k in LEVELS},
        "direct": {str(k): {m: round(v, 3) for m, v in direct[k].items() if m != "cpu_us"} for k in LEVELS},
    }
    print(f"targets: added_p50_ms_1 <= 1.0 (got {summary['added_p50_ms_1']}), "
          f"rps_64 >= 3000 (got {summary['rps_64']}), "
          f"budget_overhead_ratio_1 <= 1.2 (got {summary['budget_overhead_ratio_1']}), "
          f"chain_added_p50_ms_1 <= 0.1 (got {summary['chain_added_p50_ms_1']})")
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from shared.logging import configure_logging

    configure_logging("warning", "console", service="bench")  # stderr: the last line of stdout is the JSON
    asyncio.run(main(args.seconds, args.rounds))
