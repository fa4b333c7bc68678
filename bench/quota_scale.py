"""Quota at scale: what PostgreSQL pays per admitted request, with 1 to 8 gateways.

    .venv/bin/python bench/quota_scale.py [--gateways 1,2,4,8] [--users 10000] [--requests 6000]
                                          [--in-flight 32] [--zipf 1.1] [--workers 1] [--statements]
                                          [--long-lease-ttl 30] [--spread key|round-robin]

Real processes on loopback, as bench/gateway.py starts them: a DHT seed and
the caller in this process; `python -m services.auth`, the gateways
(`python -m services.gateway`) and `--workers` echo workers
(`python -m services.inference`, the zero-cost backend) on the embedded
PostgreSQL (or the server of DATABASE_URL), auth's database and the
gateways' on one server.

`--users` users, each with one API key, are written straight into auth's
tables before auth starts (registering them would hash 10,000 passwords):
a `bench` tier with room (requests per hour and month, tokens per month,
none of them near), so every request is admitted from a lease -- three
counters per user -- journaled and shipped, as a paying user's is.

The gateways are started one step at a time (1, then 2, 4, 8: the earlier
ones keep running). Every 240 s (the first step, and later ones if the run
is long) each user makes one request, so that auth has every key in memory
(it keeps one 300 s): a key seen for the first time in 5 minutes costs auth
a lookup (two statements), which this bench does not count. Each step:

1. a warm-up of `--requests` / 2 requests (the gateways' key caches, leases);
2. every usage record shipped (each gateway's `gateway.health`), ~12 s for
   the statistics collector (a backend flushes its counts at most every
   second when busy, and up to 10 s after going idle), snapshot A;
3. the measured load: `--requests` requests at `--in-flight` in flight,
   each one's user drawn from a Zipf distribution (exponent `--zipf`) over
   the users, and its gateway chosen as the web service and the CLI choose
   it: by the caller's key (`GatewayClient.infer`, one key's requests to one
   gateway: services/gateway/README.md, "Key-affine gateways"); with
   `--spread round-robin`, over the gateways in turn instead (every key's
   requests at every gateway: the figures before key affinity);
4. every record shipped, ~12 s, snapshot B of auth's database; the long
   leases' TTL more (`--long-lease-ttl`, the gateways'
   INFERSWARM_GATEWAY_LONG_LEASE_TTL: the load's leases given back within
   the span), snapshot B of the gateways'; ~12 s without a request,
   snapshot C: the background's rate (heartbeats, janitors, the
   key-invalidation, price and settings polls).

A snapshot reads `pg_stat_database` (`xact_commit + xact_rollback`) and
`pg_stat_user_tables` (rows inserted, updated, deleted) of both databases,
and `pg_stat_user_functions` of the gateways' (calls of `quota_turn` -- one a writer
turn --, `quota_grant`, `quota_claim`,
`quota_release`, `quota_orphan`: track_functions is `pl` for the run), over
a connection of its own to each; the bench's own two statements per span and
database are subtracted. `--statements` also counts every statement of the
measured loads from the server's log (a diagnosis: logging slows the server).

Per step: transactions per request (all, background included) and request
driven (the background's rate over the measured span subtracted), rows
written per 1,000 requests (by table), the quota functions' calls, requests
per second, each gateway's share of the measured requests (`gateway.health`),
and the client's end-to-end p50/p99 through the gateway (a whole
stream; the gateway does not expose its admission time alone). The last line
is JSON: `transactions_per_request` (request driven) and
`transactions_per_request_all` by gateway count, and the details per step.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway import Children, bench_databases, find, until_served  # noqa: E402  (bench/gateway.py)

MODEL = "bench"
TIER = "bench"
MESSAGES = [{"role": "user", "content": "Say hello."}]
SETTLE = 12.0  #: seconds for the statistics of idle backends to reach the shared counters
BENCH_XACTS = 2  #: the bench's own transactions per snapshot interval and database (below)
FUNCTIONS = ("quota_turn", "quota_grant", "quota_claim", "quota_release", "quota_orphan")
TOUCH_EVERY = 240.0  #: seconds; auth keeps a validated key in memory 300 s (INFERSWARM_AUTH_CACHE_TTL)

#: Starts request number i (`gateway.infer` with these parameters) at some gateway: see `spread`.
Start = Callable[[int, dict[str, Any]], Awaitable[Any]]


# -- users ------------------------------------------------------------------------------


async def make_users(dsn: str, count: int) -> list[str]:
    """`count` users on the `bench` tier, one API key each, written in two statements
    (auth's schema made first, as auth makes it); the keys."""
    from shared.db import apply_migrations, close_pool, create_pool
    from services.auth.keys import display_prefix, generate_key, hash_key
    from services.auth.app import MIGRATIONS

    keys = [generate_key() for _ in range(count)]
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        await apply_migrations(pool, MIGRATIONS)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO tiers (name, requests_per_hour, requests_per_month, tokens_per_month, priority,"
                " updated_at) VALUES ($1, 10000000, 1000000000, 1000000000000, 1, now())", TIER)
            names = [f"scale{i}" for i in range(count)]
            ids = await conn.fetch(
                "INSERT INTO users (username, email, password_hash, tier, username_key, email_key)"
                " SELECT n, n || '@example.org', 'no login', $2, n, n || '@example.org'"
                " FROM unnest($1::text[]) WITH ORDINALITY AS x(n, i) ORDER BY i RETURNING id",
                names, TIER)
            await conn.execute(
                "INSERT INTO api_keys (user_id, name, key_hash, prefix)"
                " SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::text[])",
                [r["id"] for r in ids], ["scale"] * count, [hash_key(k) for k in keys],
                [display_prefix(k) for k in keys])
    finally:
        await close_pool(pool)
    return keys


class Zipf:
    """Indices 0..n-1, index i drawn with weight 1 / (i + 1) ** s."""

    def __init__(self, n: int, s: float, seed: int = 1) -> None:
        self._cumulative = list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))
        self._random = random.Random(seed)

    def draw(self) -> int:
        return bisect.bisect_left(self._cumulative, self._random.random() * self._cumulative[-1])


# -- statistics ---------------------------------------------------------------------------


class Stats:
    """Snapshots of one database's counters, read over a connection of its own.

    Each snapshot is one statement, then `pg_stat_force_next_flush()`: both are
    counted by the next snapshot (BENCH_XACTS), and neither writes a row."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def snapshot(self) -> dict[str, Any]:
        row = await self._conn.fetchrow(
            "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database())"
            "   AS xacts,"
            " (SELECT coalesce(json_object_agg(relname, json_build_array(n_tup_ins, n_tup_upd, n_tup_del)), '{}')"
            "   FROM pg_stat_user_tables) AS tables,"
            " (SELECT coalesce(json_object_agg(funcname, calls), '{}') FROM pg_stat_user_functions) AS functions")
        await self._conn.execute("SELECT pg_stat_force_next_flush()")
        return {"at": time.monotonic(), "xacts": row["xacts"], "tables": json.loads(row["tables"]),
                "functions": json.loads(row["functions"])}


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What happened between snapshots `a` and `b`, the bench's own statements taken out."""
    tables = {}
    for name, after in b["tables"].items():
        before = a["tables"].get(name, [0, 0, 0])
        changed = [x - y for x, y in zip(after, before)]
        if any(changed):
            tables[name] = changed
    functions = {f: b["functions"].get(f, 0) - a["functions"].get(f, 0) for f in FUNCTIONS}
    return {"seconds": b["at"] - a["at"], "xacts": b["xacts"] - a["xacts"] - BENCH_XACTS, "tables": tables,
            "functions": {f: n for f, n in functions.items() if n}}


# -- load ---------------------------------------------------------------------------------


def spread(how: str, mesh: Any, gateways: list[Any]) -> Start:
    """How requests reach the gateways: by the caller's key through `GatewayClient`, as the
    web service and the CLI send them (`key`), or over `gateways` (connections) in turn."""
    from services.gateway.client import GatewayClient

    if how == "round-robin":
        return lambda i, params: gateways[i % len(gateways)].stream("gateway.infer", params, timeout=30.0)
    client = GatewayClient(mesh("gateway"))
    return lambda i, params: client.infer(**params, timeout=30.0)


async def load(start_one: Start, keys: list[str], pick: Callable[[], int], count: int,
               in_flight: int) -> dict[str, Any]:
    """`count` requests, `in_flight` at a time, each started by `start_one`; `pick` draws the user."""
    from shared.errors import MeshError

    latencies: list[float] = []
    errors: dict[str, int] = {}
    turn = itertools.count()
    users: set[int] = set()

    async def one() -> None:
        i = next(turn)
        user = pick()
        users.add(user)
        params = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "api_key": keys[user]}
        start = time.perf_counter()
        try:
            stream = await start_one(i, params)
            chunks = [chunk async for chunk in stream]
            if not chunks or not chunks[-1].get("done"):
                raise RuntimeError("no final chunk")
            latencies.append(time.perf_counter() - start)
        except (MeshError, RuntimeError) as exc:
            name = getattr(exc, "code", type(exc).__name__)
            errors[name] = errors.get(name, 0) + 1

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    share = [count // in_flight + (1 if i < count % in_flight else 0) for i in range(in_flight)]
    began = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(n) for n in share)), timeout=max(120.0, count / 20))
    elapsed = time.perf_counter() - began
    latencies.sort()
    ok = len(latencies)
    return {
        "admitted": ok, "errors": errors, "users": len(users), "seconds": elapsed, "rps": ok / elapsed,
        "p50_ms": latencies[ok // 2] * 1000 if ok else None,
        "p99_ms": latencies[max(0, int(ok * 0.99) - 1)] * 1000 if ok else None,
    }


async def touch(start_one: Start, keys: list[str], in_flight: int) -> float:
    """One request of every user: auth has every key in memory (the steady state of a
    user's key: a key seen for the first time in 300 s costs auth a lookup, not measured)."""
    order = iter(range(len(keys)))
    began = time.monotonic()
    done = await load(start_one, keys, lambda: next(order), len(keys), in_flight)
    if done["errors"]:
        raise SystemExit(f"errors while touching every key: {done['errors']}")
    print(f"every key used once in {time.monotonic() - began:.1f} s", file=sys.stderr)
    return began


# -- the run ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    import asyncpg

    from shared.config import MeshConfig, Secret
    from shared.db import with_database
    from shared.dht import model_topic, service_topic
    from shared.identity import MeshCredential
    from shared.runner import join_mesh

    steps = sorted({int(n) for n in args.gateways.split(",")})
    secret = MeshCredential.new_secret().hex()
    with tempfile.TemporaryDirectory(prefix="quota-scale-") as tmp:
        root = Path(tmp)
        async with AsyncExitStack() as stack:
            if args.statements and os.environ.get("DATABASE_URL") is not None:
                raise SystemExit("--statements reads the embedded server's log: unset DATABASE_URL")
            url, auth_dsn, gateway_dsn = await bench_databases(stack, root)
            admin = await asyncpg.connect(with_database(url, "postgres"))
            stack.push_async_callback(admin.close)
            try:
                await admin.execute("ALTER SYSTEM SET track_functions = 'pl'")
                await admin.execute("SELECT pg_reload_conf()")
                stack.push_async_callback(reset_track_functions, admin)
            except asyncpg.InsufficientPrivilegeError:  # a server of DATABASE_URL, not as its superuser
                print("not a superuser: the quota functions' calls are not counted", file=sys.stderr)
            args.statements = StatementLog(admin, root / "pgdata" / "log") if args.statements else None
            started = time.perf_counter()
            keys = await make_users(auth_dsn, args.users)
            print(f"{args.users} users and keys written in {time.perf_counter() - started:.1f} s", file=sys.stderr)

            client = await join_mesh(stack, "caller", MeshConfig(
                data_dir=root / "caller", mesh_secret=Secret(secret), record_ttl=30.0))
            base = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_") and k != "DATABASE_URL"}
            base.update(INFERSWARM_MESH_SECRET=secret, INFERSWARM_BOOTSTRAP=client.discovery.address,
                        INFERSWARM_LOG_LEVEL="warning", PYTHONHASHSEED="0")
            gateway_env = {"INFERSWARM_GATEWAY_LONG_LEASE_TTL": str(args.long_lease_ttl)}
            children = Children(root, base)
            stack.push_async_callback(children.stop)
            echo = json.dumps({MODEL: {"backend": "echo", "slots": 256, "queue": 1024}})
            await asyncio.gather(
                children.start("auth", [sys.executable, "-m", "services.auth"], DATABASE_URL=auth_dsn,
                               INFERSWARM_DATA_DIR=str(root / "auth")),
                *(children.start(f"worker{i}", [sys.executable, "-m", "services.inference"],
                                 INFERSWARM_DATA_DIR=str(root / f"worker{i}"), INFERSWARM_CACHE_TTL="0",
                                 INFERSWARM_MODELS=echo) for i in range(args.workers)))
            await find(client.discovery, service_topic("auth"))
            await find(client.discovery, model_topic(MODEL), args.workers)
            stats = {}
            for name, dsn in (("auth", auth_dsn), ("gateway", gateway_dsn)):
                conn = await asyncpg.connect(dsn)
                stack.push_async_callback(conn.close)
                stats[name] = Stats(conn)

            zipf = Zipf(args.users, args.zipf)
            endpoints: list[str] = []
            results: dict[int, dict[str, Any]] = {}
            touched = -1e9
            for n in steps:
                while len(endpoints) < n:
                    ready = await children.start(
                        f"gateway{len(endpoints)}", [sys.executable, "-m", "services.gateway"],
                        DATABASE_URL=gateway_dsn, INFERSWARM_DATA_DIR=str(root / f"gateway{len(endpoints)}"),
                        **gateway_env)
                    endpoints.append(ready["endpoint"])
                providers = {p.endpoint: p for p in await find(client.discovery, service_topic("gateway"), n)}
                gateways = [client.mesh.connection(providers[e]) for e in endpoints]
                for gateway in gateways:
                    await until_served(gateway, {"model": MODEL, "messages": MESSAGES, "api_key": keys[0]})
                start_one = spread(args.spread, client.mesh, gateways)
                if time.monotonic() - touched > TOUCH_EVERY:
                    touched = await touch(start_one, keys, args.in_flight)
                results[n] = await step(start_one, gateways, keys, zipf, stats, args, root)
                report_step(n, results[n])
            summary = {
                "transactions_per_request": {str(n): round(r["per_request"], 4) for n, r in results.items()},
                "transactions_per_request_all": {str(n): round(r["per_request_all"], 4)
                                                 for n, r in results.items()},
                "users": args.users, "requests": args.requests, "in_flight": args.in_flight, "zipf": args.zipf,
                "workers": args.workers, "long_lease_ttl": args.long_lease_ttl, "spread": args.spread,
                "steps": {str(n): r for n, r in results.items()},
            }
            report(results)
            print(json.dumps(summary, default=round_floats))


async def reset_track_functions(admin: Any) -> None:
    """A server of DATABASE_URL gets its setting back."""
    await admin.execute("ALTER SYSTEM RESET track_functions")
    await admin.execute("SELECT pg_reload_conf()")


async def step(start_one: Start, gateways: list[Any], keys: list[str], zipf: Zipf, stats: dict[str, Stats],
               args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """Warm up, then measure the load and the background after it (see the module doc)."""
    warm = await load(start_one, keys, zipf.draw, args.requests // 2, args.in_flight)
    if warm["errors"]:  # reported (with the gateways' logs); too many and nothing is measured
        print(f"errors in the warm-up: {warm['errors']}", file=sys.stderr)
        for log in sorted(logs.glob("gateway*.log")):
            print(f"{log.name}:\n{log.read_text()[-2000:]}", file=sys.stderr)
        if sum(warm["errors"].values()) > warm["admitted"] / 100:
            raise SystemExit("more than 1% of the warm-up failed")
    served_before = await drained(gateways)
    await asyncio.sleep(SETTLE)
    before = {name: await s.snapshot() for name, s in stats.items()}
    if args.statements is not None:
        async with args.statements.logging():
            measured = await load(start_one, keys, zipf.draw, args.requests, args.in_flight)
    else:
        measured = await load(start_one, keys, zipf.draw, args.requests, args.in_flight)
    served = [b - a for a, b in zip(served_before, await drained(gateways))]
    measured["gateway_shares"] = [round(n / max(1, sum(served)), 3) for n in served]
    await asyncio.sleep(SETTLE)
    after = {"auth": await stats["auth"].snapshot()}
    # The gateways' span runs on until the load's long leases have been given back
    # (auth's does not: a longer span would only make its background's share noisier).
    await asyncio.sleep(args.long_lease_ttl)
    after.update({name: await s.snapshot() for name, s in stats.items() if name != "auth"})
    await asyncio.sleep(SETTLE)
    idle = {name: await s.snapshot() for name, s in stats.items()}
    admitted = measured["admitted"]
    if not admitted:
        raise SystemExit(f"no request admitted: {measured['errors']}")
    databases = {}
    for name in stats:
        load_delta, idle_delta = delta(before[name], after[name]), delta(after[name], idle[name])
        background = idle_delta["xacts"] / idle_delta["seconds"]
        databases[name] = {
            "xacts": load_delta["xacts"],
            "background_per_s": background,
            "request_xacts": load_delta["xacts"] - background * load_delta["seconds"],
            "rows_per_1000": {t: [round(x * 1000 / admitted, 1) for x in v] for t, v in load_delta["tables"].items()},
            "functions": load_delta["functions"],
            "idle_functions_per_s": {f: c / idle_delta["seconds"] for f, c in idle_delta["functions"].items()},
        }
    total = sum(d["xacts"] for d in databases.values())
    driven = sum(d["request_xacts"] for d in databases.values())
    rows = sum(sum(sum(v) for v in d["rows_per_1000"].values()) for d in databases.values())
    result = {**measured, "per_request_all": total / admitted, "per_request": driven / admitted,
              "rows_per_1000": rows, "databases": databases}
    if args.statements is not None:
        result["statements_per_1000"] = args.statements.counted(admitted)
    return result


class StatementLog:
    """`--statements`: the server logs every statement during the measured load (a
    diagnosis: it slows the server, so that run's latencies are not the figures);
    counted by database and statement, from the embedded server's log file."""

    _LINE = re.compile(r"^(\w+)\|LOG:  (?:statement|execute [^:]*): (.*)$")

    def __init__(self, admin: Any, log: Path) -> None:
        self._admin = admin
        self._log = log
        self._offset = 0

    @asynccontextmanager
    async def logging(self) -> AsyncIterator[None]:
        self._offset = self._log.stat().st_size
        await self._set("ALTER SYSTEM SET log_line_prefix = '%d|'", "ALTER SYSTEM SET log_statement = 'all'")
        try:
            yield
        finally:
            await self._set("ALTER SYSTEM RESET log_statement", "ALTER SYSTEM RESET log_line_prefix")

    async def _set(self, *statements: str) -> None:
        for statement in statements:
            await self._admin.execute(statement)
        await self._admin.execute("SELECT pg_reload_conf()")
        await asyncio.sleep(0.5)  # every backend reads the file again when it next goes idle

    def counted(self, admitted: int) -> dict[str, dict[str, float]]:
        """Statements per 1,000 requests, by database, the most frequent first."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        with self._log.open(errors="replace") as log:
            log.seek(self._offset)
            lines = iter(log)
            for line in lines:
                match = self._LINE.match(line.rstrip("\n"))
                if match and match[1].startswith("bench_"):
                    text = match[2].strip()
                    while not text:  # a statement that starts with a line break: its first line
                        text = next(lines, "-").strip()
                    counts[match[1].split("_")[1], " ".join(text.split())[:80]] += 1
        found: dict[str, dict[str, float]] = {}
        for (database, text), n in counts.most_common():
            found.setdefault(database, {})[text] = round(n * 1000 / admitted, 1)
        return found


async def drained(gateways: list[Any], timeout: float = 120.0) -> list[int]:
    """Wait until every gateway has shipped its usage records (`gateway.health`): a
    backlog shipped later would count in the wrong span. Each one's requests so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        healths = [await g.call("gateway.health", {}, timeout=10.0) for g in gateways]
        if all(h["usage_unshipped"] == 0 for h in healths):
            return [sum(h["requests"].values()) for h in healths]
        await asyncio.sleep(0.2)
    raise SystemExit(f"usage records still unshipped after {timeout:.0f} s")


def round_floats(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else str(value)


def report_step(n: int, r: dict[str, Any]) -> None:
    print(f"-- {n} gateway(s): {r['admitted']} admitted of {r['users']} users in {r['seconds']:.1f} s "
          f"({r['rps']:.0f} req/s), p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}; "
          f"the gateways' shares {r['gateway_shares']}")
    for database, statements in r.get("statements_per_1000", {}).items():
        print(f"   {database} statements per 1,000 requests (each one's first line):")
        for text, n in list(statements.items())[:15]:
            print(f"   {n:>9.1f}  {text}")
    for name, d in r["databases"].items():
        print(f"   {name:>7} db: {d['xacts']} transactions ({d['request_xacts'] / r['admitted']:.4f}/request after "
              f"{d['background_per_s']:.1f}/s of background); functions {d['functions']}")
        for table, (ins, upd, dele) in sorted(d["rows_per_1000"].items()):
            print(f"   {'':>7}    {table:<22} per 1,000 requests: {ins:>8.1f} inserted {upd:>8.1f} updated "
                  f"{dele:>8.1f} deleted")
    sys.stdout.flush()


def report(results: dict[int, dict[str, Any]]) -> None:
    print(f"{'gateways':>8} | {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} | {'tx/req':>7} {'tx/req all':>10} "
          f"{'gw tx/req':>9} {'auth tx/req':>11} | {'rows/1000 req':>13}")
    for n, r in results.items():
        gw, auth = (r["databases"][d]["request_xacts"] / r["admitted"] for d in ("gateway", "auth"))
        print(f"{n:>8} | {r['rps']:>6.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} | {r['per_request']:>7.4f} "
              f"{r['per_request_all']:>10.4f} {gw:>9.4f} {auth:>11.4f} | {r['rows_per_1000']:>13.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateways", default="1,2,4,8", help="gateway counts, in steps (comma-separated)")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=6000, help="measured per step (half as many to warm up)")
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.1, help="the exponent of the users' Zipf distribution")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--long-lease-ttl", type=float, default=30.0,
                        help="the gateways' INFERSWARM_GATEWAY_LONG_LEASE_TTL (0: no long leases)")
    parser.add_argument("--spread", choices=("key", "round-robin"), default="key",
                        help="the caller's gateway: by its key, as the web service and the CLI choose it, "
                             "or each request at the next gateway in turn (the figures before key affinity)")
    parser.add_argument("--statements", action="store_true",
                        help="log and count the statements of each measured load (slows the server)")
    args = parser.parse_args()
    from shared.logging import configure_logging

    configure_logging("warning", "console", service="bench")  # stderr: the last line of stdout is the JSON
    asyncio.run(run(args))
