"""The fault suite: under a steady bounded load, kill -9 a worker, a gateway,
the auth service and the metrics service, and crash-restart PostgreSQL, each
in turn. After each: the victim runs again, the load is served again within
the fault's stated bound, the supervisor runs exactly one live process per
service. At the end: every admitted request has exactly one usage record, the
free-tier user was never admitted past its limit (and, exactly, up to it), and
stopping `up` leaves no process behind.

One stack for the module: `inferswarm up --gateways 2 --workers 2` on a
PostgreSQL this module started (`DATABASE_URL`), so that it can crash it
(`pg_ctl stop -m immediate`, then start on the same data directory); the
workers serve an echo model paced like a small real one (streams of ~0.3 s).
The worker and the gateway killed are the ones busiest at that moment, so
streams are cut. The load runs from the first test to the accounting tests:

* "steady": 6 clients of an unlimited-tier user, each one request at a time
  (10 s deadline) through the mesh client, which picks a gateway and fails over;
* "limited": 4 clients of a free-tier user (100 requests/hour), two pinned to
  each gateway: the limit runs out in the middle of the faults, after being
  spent through both gateways, one of which is killed; then they are refused
  through the later faults, and after them until each has been refused.

Each request has a unique prompt, so its usage record is found by prompt hash
even when the client never learnt its request id (a stream cut by a gateway's
death). Run with `-s` to see each fault's report line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from shared.config import MeshConfig, Secret
from shared.db import with_database
from shared.dht import model_topic, service_topic
from shared.errors import MeshError
from shared.runner import MeshNode, join_mesh
from fault_support import (
    SLOW,
    Call,
    Load,
    RestartablePostgres,
    Supervised,
    count_by,
    fetch,
    observe,
    prompt_hash,
    recovery,
)
from stack import free_udp_port

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.faults]

MODEL = "echo"
#: 10 words at 30 ms apart: a stream of ~0.3 s, the pace of a small local model.
CATALOG = {MODEL: {"backend": "echo", "slots": 64, "delay": 0.03}}
WORDS = 10
ADMIN = "faults-admin@example.org"
PASSWORD = "fault drills, long enough"
FREE_LIMIT = 100  # requests_per_hour of the free tier (shared/tiers.py)
SERVICES = ("bootstrap", "auth", "metrics", "inference-1", "inference-2", "gateway-1", "gateway-2", "web")

#: A killed child is running and ready again within this many seconds. The
#: supervisor waits 1 s before the first restart (its backoff starts at 1 s),
#: and a service is ready ~1-2 s after it starts here; the rest is margin for
#: a slower or busier machine.
RESTARTED_WITHIN = 15.0

#: The steady load is served again within this many seconds of the fault: the
#: end of the first request served in time after the last one that failed or
#: took over `SLOW` seconds (fault_support.recovery).
SERVES_AGAIN_WITHIN = {
    # The other worker takes over at once: the gateway retries a request on
    # another worker until the first token. Only streams cut mid-answer fail.
    "worker": 3.0,
    # The mesh client fails over to the other gateway: a request to the dead
    # one waits at most its connect timeout (3 s) and is retried elsewhere
    # (it provably never reached a server); the dead one is then avoided.
    "gateway": 6.0,
    # Nobody can be authenticated without auth once the gateways' key caches
    # stop being trusted (1 s after their last poll of auth), so this is the
    # restart (1 s backoff + start, ~3 s) plus finding the new endpoint (DHT
    # lookups cached 1 s), with margin.
    "auth": 15.0,
    # Nothing on the request path needs the metrics service: no request fails
    # (asserted apart); only the CPU its restart takes may slow a few.
    "metrics": 3.0,
    # From PostgreSQL accepting connections again: connection pools open new
    # connections on the next query, auth re-opens its invalidation listener
    # on its next poll (0.5 s), gateways' key caches trust auth again after
    # their next poll (0.25 s), and their quota writers grant leases again
    # after their current backoff (at most 2 s).
    "postgres": 5.0,
}
#: How long PostgreSQL stays down: long enough that every lease and every
#: key cache has expired (1 s each), so the outage is felt everywhere, and
#: longer than `ANSWERED_WITHIN`, so a request held until the server returns shows.
POSTGRES_DOWN = 6.0
#: While PostgreSQL is down a request is still answered -- served from a lease,
#: or refused with UNAVAILABLE -- within this many seconds, not held until the
#: server returns: the gateway's quota writer retries the database with a
#: backoff of at most 2 s, and each failed turn fails the requests waiting on it.
ANSWERED_WITHIN = 4.0


# -- the stack ----------------------------------------------------------------------------


@dataclass
class Stack:
    pg: RestartablePostgres
    up: Supervised
    mesh: MeshNode
    load: Load
    users: dict[str, dict[str, Any]]
    drills: dict[str, Drill] = field(default_factory=dict)  #: the faults run so far


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    """PostgreSQL, `up` on it, our mesh client, two users, the load running.
    Torn down whatever happened: up stopped (anything it left killed), then
    PostgreSQL stopped and its data deleted."""
    root = tmp_path_factory.mktemp("faults")
    pg = RestartablePostgres(root / "pg")
    await pg.start()
    env = {"DATABASE_URL": pg.dsn, "INFERSWARM_MODELS": json.dumps(CATALOG),
           # cheap password hashing: logins are not what is tested here
           "INFERSWARM_ARGON2_TIME_COST": "1", "INFERSWARM_ARGON2_MEMORY_KIB": "8",
           "INFERSWARM_ARGON2_PARALLELISM": "1"}
    up = Supervised(root / "data", free_udp_port(), "--gateways", "2", "--workers", "2", env=env)
    try:
        ready = await asyncio.to_thread(up.wait_ready)
        async with AsyncExitStack() as exits:
            secret = (root / "data" / "mesh.secret").read_text().strip()
            mesh = await join_mesh(exits, "faults-client", MeshConfig(
                data_dir=root / "client", mesh_secret=Secret(secret), bootstrap=(ready["bootstrap"],)))
            users = await prepare_users(mesh)
            load = Load(mesh, MODEL, words=WORDS, deadline=10.0)
            exits.push_async_callback(load.stop_all)
            load.start("steady", users["steady"]["api_key"], 6, pause=0.05)
            load.start("limited", users["limited"]["api_key"], 4, pause=0.1, pinned=True)
            yield Stack(pg, up, mesh, load, users)
    finally:
        await asyncio.to_thread(up.stop, 60)
        up.kill_everything()
        await pg.stop()


async def prepare_users(mesh: MeshNode) -> dict[str, dict[str, Any]]:
    """An admin (granted by us, a mesh member, as the operator grants one); "steady"
    moved to the unlimited tier; "limited" left on free."""
    auth = mesh.mesh("auth")
    users = {}
    for name, email in (("faultadmin", ADMIN), ("steady", "steady@example.org"), ("limited", "limited@example.org")):
        for attempt in range(50):  # right after `up`, the mesh client may not see auth yet
            try:
                user = await auth.call("auth.register", {"username": name, "email": email, "password": PASSWORD})
                break
            except MeshError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.2)
        token = (await auth.call("auth.login", {"username_or_email": name, "password": PASSWORD}))["token"]
        users[name] = {"id": user["id"], "token": token}
    await auth.call("auth.grant_admin", {"user": "faultadmin", "reason": "faults test"})
    admin = users.pop("faultadmin")["token"]
    await auth.call("auth.set_tier", {"token": admin, "user": "steady", "tier": "unlimited"})
    for name, user in users.items():
        user["api_key"] = (await auth.call("auth.create_key", {"token": user["token"], "name": "faults"}))["api_key"]
    return users


# -- one fault -------------------------------------------------------------------------------


@dataclass
class Drill:
    """One fault and what the load saw of it."""

    fault: str
    victim: str
    old_pid: int
    began: float  #: time.monotonic() of the fault
    ready: dict[str, Any] | None = None  #: the restarted child's ready event
    back: float = 0.0  #: time.monotonic() when it was ready again
    served_again: float = 0.0
    failed: int = 0
    slow: int = 0
    served: int = 0
    errors: dict[str, int] | None = None
    cut: int = 0  #: streams in flight at the fault that ended in an error
    longest: float = 0.0  #: the longest request started after the fault, seconds

    def line(self) -> str:
        restart = (f"restarted in {self.back - self.began:.1f} s (pid {self.old_pid} -> {self.ready['pid']})"
                   if self.ready else "no restart")
        return (f"[fault] {self.fault} ({self.victim}): {restart}; {self.cut} streams cut; served again "
                f"{self.served_again:.2f} s after the fault (bound {SERVES_AGAIN_WITHIN[self.fault]} s); "
                f"of {self.failed + self.slow + self.served} requests started after it {self.failed} failed "
                f"{self.errors or ''}, {self.slow} took over {SLOW} s (the longest {self.longest:.1f} s)")


async def healthy_before(stack: Stack) -> None:
    """Faults do not overlap: the steady load has been served well for a second."""
    await observe(stack.load, "steady", time.monotonic(), quiet=1.0, timeout=30.0)


async def kill_and_watch(stack: Stack, victim: str, fault: str) -> Drill:
    """kill -9 `victim`; wait for its restart and for the load to be served again."""
    old_pid = stack.up.pid_of(victim)
    drill = Drill(fault, victim, old_pid, time.monotonic())
    os.kill(old_pid, signal.SIGKILL)
    drill.ready = await stack.up.wait_restarted(victim, old_pid, RESTARTED_WITHIN)
    drill.back = time.monotonic()
    assert any(f"{victim} exited with status -9" in line for line in stack.up.said), stack.up.said
    return await watch(stack, drill, since=drill.began)


async def watch(stack: Stack, drill: Drill, since: float) -> Drill:
    """Wait for 2 quiet seconds of steady load (every request in them served),
    then measure from `since` and check the process tree."""
    bound = SERVES_AGAIN_WITHIN[drill.fault]
    measured = await observe(stack.load, "steady", since, quiet=2.0, timeout=bound + 15.0)
    steady = stack.load.of("steady")
    drill.served_again, drill.failed, drill.slow, drill.served, drill.errors = (
        measured.seconds, measured.failed, measured.slow, measured.served, measured.errors)
    drill.cut = sum(1 for c in steady if c.started < drill.began <= c.ended and not c.ok and c.text_chunks)
    drill.longest = max((c.ended - c.started for c in steady if c.started >= since and c.status != "pending"),
                        default=0.0)
    print(drill.line())
    stack.drills[drill.fault] = drill
    assert drill.served > 0, "no request succeeded after the fault"
    assert drill.served_again <= bound, drill.line()
    assert stack.up.problems(SERVICES) == [], "not exactly one live process per service"
    return drill


async def provider_at(stack: Stack, topic: str, endpoint: str, timeout: float = 10.0) -> Any:
    """The announced provider of `topic` at `endpoint` (a restarted child's new one)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for provider in await stack.mesh.discovery.lookup(topic):
                if provider.endpoint == endpoint:
                    return provider
        except MeshError:
            pass  # none announced yet
        assert time.monotonic() < deadline, f"nothing announced {topic} at {endpoint}"
        await asyncio.sleep(0.2)


async def busiest_worker(stack: Stack) -> str:
    """The worker that answered most of the last second's requests: the one
    with streams in flight (at low load the gateways favour one worker)."""
    names = stack.up.names_by_endpoint(("inference-1", "inference-2"))
    by_key = {p.node_hex: names.get(p.endpoint) for p in await stack.mesh.discovery.lookup(model_topic(MODEL))}
    recent = [c.worker for c in stack.load.of("steady") if c.ok and c.ended > time.monotonic() - 1.0]
    ranked = sorted(count_by(recent, lambda w: w).items(), key=lambda item: -item[1])
    return next((by_key[w] for w, _ in ranked if by_key.get(w)), "inference-1")


async def busiest_gateway(stack: Stack, timeout: float = 5.0) -> str:
    """The gateway with the most of our requests in flight (waiting, at most
    `timeout` s, for a few), so that its death cuts streams."""
    names = stack.up.names_by_endpoint(("gateway-1", "gateway-2"))
    deadline = time.monotonic() + timeout
    while True:
        providers = await stack.mesh.discovery.lookup(service_topic("gateway"))
        busiest = max(providers, key=lambda p: stack.mesh.mesh.connection(p).in_flight)
        if stack.mesh.mesh.connection(busiest).in_flight >= 3 or time.monotonic() > deadline:
            return names[busiest.endpoint]
        await asyncio.sleep(0.02)


# -- the faults, in turn ---------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_worker_killed_mid_stream_is_replaced_at_once_and_restarted(stack):
    await healthy_before(stack)
    drill = await kill_and_watch(stack, await busiest_worker(stack), "worker")
    # The restarted worker is found again (new endpoint, same key) and gets requests.
    provider = await provider_at(stack, model_topic(MODEL), drill.ready["endpoint"])
    deadline = time.monotonic() + RESTARTED_WITHIN
    while not any(c.ok and c.worker == provider.node_hex and c.started >= drill.back for c in stack.load.calls):
        served_by = count_by([c for c in stack.load.calls if c.started >= drill.back], lambda c: (c.status, c.worker))
        assert time.monotonic() < deadline, f"the restarted worker {provider.node_hex} got no request: {served_by}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(90)
async def test_a_gateway_killed_mid_stream_fails_over_and_comes_back_with_its_journal(stack):
    await healthy_before(stack)
    drill = await kill_and_watch(stack, await busiest_gateway(stack), "gateway")
    # It is announced at its new endpoint and counts both gateways live again
    # (its heartbeat row is back); its journal's records are checked in the books.
    provider = await provider_at(stack, service_topic("gateway"), drill.ready["endpoint"])
    deadline = time.monotonic() + 10
    while (health := await stack.mesh.mesh.connection(provider).call("gateway.health", timeout=5.0))[
            "live_gateways"] != 2:
        assert time.monotonic() < deadline, health
        await asyncio.sleep(0.2)
    assert health["status"] == "ok"


@pytest.mark.timeout(90)
async def test_auth_killed_is_restarted_and_requests_are_authenticated_again(stack):
    await healthy_before(stack)
    await kill_and_watch(stack, "auth", "auth")


@pytest.mark.timeout(90)
async def test_the_metrics_service_killed_interrupts_nothing_and_comes_back(stack):
    await healthy_before(stack)
    drill = await kill_and_watch(stack, "metrics", "metrics")
    assert drill.failed == 0
    url = stack.up.ready["metrics"].replace("/metrics", "/health")
    deadline = time.monotonic() + RESTARTED_WITHIN
    async with aiohttp.ClientSession() as http:
        while True:  # the same port again
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} does not answer 200"
            await asyncio.sleep(0.2)


@pytest.mark.timeout(90)
async def test_a_postgres_crash_and_restart_is_survived_by_every_service(stack):
    await healthy_before(stack)
    pids = {name: stack.up.pid_of(name) for name in SERVICES}
    old_postmaster = stack.pg.postmaster() or 0
    drill = Drill("postgres", f"postmaster {old_postmaster}", old_postmaster, time.monotonic())
    await stack.pg.crash()
    await asyncio.sleep(POSTGRES_DOWN)  # kept (the behaviour): the outage the services must ride out
    await stack.pg.start_again()
    drill.back = time.monotonic()
    assert stack.pg.postmaster() not in (None, old_postmaster)
    await watch(stack, drill, since=drill.back)  # measured from the server's return
    during = recovery(stack.load.of("steady"), drill.began, drill.back)
    held = sorted(round(c.ended - c.started, 1) for c in stack.load.of("steady")
                  if drill.began <= c.started < drill.back and c.ended - c.started > ANSWERED_WITHIN)
    print(f"[fault] postgres: down {drill.back - drill.began:.1f} s (new postmaster {stack.pg.postmaster()}); "
          f"of {during.failed + during.slow + during.served} requests started meanwhile {during.failed} failed "
          f"{during.errors}, {during.slow} took over {SLOW} s, {len(held)} over {ANSWERED_WITHIN} s {held}")
    assert held == [], "requests held while the database was down, instead of answered"
    # No service died of it: the same processes serve before and after.
    assert {name: stack.up.pid_of(name) for name in SERVICES} == pids


# -- the books ---------------------------------------------------------------------------------


@dataclass
class Books:
    calls: list[Call]
    rows: list[dict[str, Any]]  #: auth's usage records of both users
    daily: dict[int, int]  #: user id -> requests in usage_daily
    counters: list[dict[str, Any]]  #: the limited user's quota counters
    limited_user: int
    gateways: dict[str, str]  #: endpoint -> gateway name, every start of each
    drills: dict[str, Drill]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def books(stack) -> Books:
    """The load stopped (the limited user refused through both gateways first),
    every gateway's journal shipped, leases returned: what was recorded."""
    load = stack.load
    await load.stop("steady")
    deadline = time.monotonic() + 60
    while not all(last.status == "RATE_LIMITED" for last in last_calls(load.of("limited")).values()):
        assert time.monotonic() < deadline, f"the limited user is still served: {last_calls(load.of('limited'))}"
        await asyncio.sleep(0.2)
    await load.stop("limited")
    await all_shipped(stack)
    await asyncio.sleep(2.5)  # leases live 1 s: unused units are back after 2
    users = [u["id"] for u in stack.users.values()]
    rows = await fetch(auth_dsn(stack), "SELECT request_id, user_id, prompt_hash, status, completion_tokens, worker,"
                       " created_at FROM usage WHERE user_id = ANY($1)", users)
    daily = await fetch(auth_dsn(stack), "SELECT user_id, sum(requests)::bigint AS n FROM usage_daily"
                        " WHERE user_id = ANY($1) GROUP BY user_id", users)
    counters = await fetch(gateway_dsn(stack), "SELECT counter, window_start, limit_value, granted"
                           " FROM quota_counters WHERE subject = $1", f"u:{stack.users['limited']['id']}")
    return Books(list(load.calls), rows, {r["user_id"]: r["n"] for r in daily}, counters,
                 stack.users["limited"]["id"], stack.up.names_by_endpoint(("gateway-1", "gateway-2")),
                 dict(stack.drills))


def last_calls(calls: list[Call]) -> dict[str, Call]:
    """Each client's latest finished request."""
    return {c.client: c for c in calls if c.status != "pending"}


def auth_dsn(stack: Stack) -> str:
    return with_database(stack.pg.dsn, "inferswarm_auth")  # as `up` names them


def gateway_dsn(stack: Stack) -> str:
    return with_database(stack.pg.dsn, "inferswarm_gateway")


async def all_shipped(stack: Stack, timeout: float = 20.0) -> None:
    """Every live gateway has shipped its whole journal to auth."""
    deadline = time.monotonic() + timeout
    while True:
        providers = await stack.mesh.discovery.lookup(service_topic("gateway"))
        healths = [await stack.mesh.mesh.connection(p).call("gateway.health", timeout=5.0) for p in providers]
        if len(healths) == 2 and all(h["usage_unshipped"] == 0 for h in healths):
            return
        assert time.monotonic() < deadline, f"usage not shipped: {healths}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_every_admitted_request_has_exactly_one_usage_record(books):
    by_hash: dict[str, list[dict[str, Any]]] = {}
    for row in books.rows:
        by_hash.setdefault(row["prompt_hash"], []).append(row)
    sent = {prompt_hash(c.prompt): c for c in books.calls}
    assert [h for h, rows in by_hash.items() if len(rows) > 1] == [], "a request recorded twice"
    assert [h for h in by_hash if h not in sent] == [], "a record of no request sent"
    missing, wrong = [], []
    for call in books.calls:
        rows = by_hash.get(prompt_hash(call.prompt), [])
        expected = expected_status(call)
        if expected is None:
            continue  # never admitted, or not known to be: a record is allowed, not required
        if not rows:
            missing.append((call.client, call.status, call.request_id, call.text_chunks))
        elif rows[0]["status"] not in expected or (call.request_id and rows[0]["request_id"] != call.request_id):
            wrong.append((call.status, call.request_id, rows[0]["status"], rows[0]["request_id"]))
    outcomes = count_by(books.calls, lambda c: c.status)
    statuses = count_by(books.rows, lambda r: r["status"])
    checked = count_by([c for c in books.calls if expected_status(c)], lambda c: "/".join(sorted(expected_status(c))))
    print(f"[books] {len(books.calls)} requests {outcomes}; {len(books.rows)} usage records {statuses}; "
          f"a record required (and found) for {checked}")
    assert missing == [], f"admitted requests without a usage record: {missing[:10]}"
    assert wrong == [], f"records that disagree with what the client saw: {wrong[:10]}"
    if "gateway" in books.drills:  # killed with requests in flight: its restart billed them
        assert statuses.get("interrupted", 0) >= 1
    # The dashboard's aggregates counted each record once, replays included.
    assert books.daily == count_by(books.rows, lambda r: r["user_id"])


def expected_status(call: Call) -> set[str] | None:
    """The record statuses that fit what the client saw; None if no record is required."""
    if call.ok:
        return {"ok"}
    if call.status == "RATE_LIMITED":
        return {"rate_limited"}
    if call.request_id is not None:  # failed after admission, and the gateway said so
        return {"worker_failed", "timeout", "unavailable"}
    if call.text_chunks > 0:  # admitted, streaming, then its gateway died: before the worker's
        # final chunk (billed "interrupted" on restart), or in the moment between journaling
        # the finished request and sending its final chunk ("ok": every token had been sent)
        return {"interrupted", "ok"}
    return None


@pytest.mark.timeout(120)
async def test_the_free_tier_user_was_admitted_exactly_its_limit_never_more(books):
    calls = [c for c in books.calls if c.client.startswith("limited-")]
    rows = [r for r in books.rows if r["user_id"] == books.limited_user]
    hourly = [c for c in books.counters if c["counter"] == "requests_per_hour"]
    ok = sum(c.ok for c in calls)
    used = [r for r in rows if holds_a_unit(r)]
    # The hour rolls (a GCRA): a burst of the limit, then one request per 36 s of the run.
    span = max((c.started_at + c.ended - c.started for c in calls), default=0.0) - min(c.started_at for c in calls)
    drained = int(span * FREE_LIMIT / 3600) + 1
    answered = count_by([c for c in calls if c.ok or c.status == "RATE_LIMITED"],
                        lambda c: books.gateways.get(c.gateway or "", c.gateway))
    refused = min((c.started for c in calls if c.status == "RATE_LIMITED"), default=0.0)
    print(f"[limit] {len(calls)} requests of the free user over {span:.0f} s, {ok} ok, first refused "
          f"{refused - calls[0].started:.0f} s after its first request; answered by {answered}; counters "
          f"{[(c['granted'], c['limit_value']) for c in hourly]}; "
          f"records holding a unit {len(used)} {count_by(used, lambda r: r['status'])}")
    assert len(calls) > FREE_LIMIT, "the free user did not ask for more than its limit"
    assert set(answered) == {"gateway-1", "gateway-2"}
    assert len(hourly) == 1 and hourly[0]["limit_value"] == FREE_LIMIT  # one rolling counter
    # The invariant: never more served than the limit and what the run's span drained;
    # and the limit reached (every unit granted is one a request used: none leaked to a crash).
    assert ok <= FREE_LIMIT + drained
    assert FREE_LIMIT <= len(used) <= FREE_LIMIT + drained, "the limit was not reached exactly"
    # Every unit granted is one a request used, exactly: the monthly counter (a calendar window) says so.
    monthly = [c for c in books.counters if c["counter"] == "requests_per_month"]
    assert sum(c["granted"] for c in monthly) == len(used)


def holds_a_unit(row: dict[str, Any]) -> bool:
    """Whether a request's record says it used its unit of the limit
    (services/gateway/README.md, "Accounting": a request a worker took keeps
    it -- text was delivered, or it was cut while a worker had it, and the
    record names that worker; a request cut by a crash counts as used)."""
    if row["status"] in ("ok", "interrupted"):
        return True
    if row["status"] in ("rate_limited", "invalid_params", "not_found"):
        return False
    return row["completion_tokens"] > 0 or (row["status"] in ("timeout", "cancelled") and row["worker"] is not None)


@pytest.mark.timeout(120)
async def test_stopping_up_leaves_no_process_behind(stack, books):
    stack.up.children()
    assert await asyncio.to_thread(stack.up.stop, 60) == 0
    restarted = [name for name in stack.up.seen.values() if list(stack.up.seen.values()).count(name) > 1]
    print(f"[stop] {len(stack.up.seen)} processes seen under up (restarted: {sorted(set(restarted))}), "
          f"{len(stack.pg.processes)} of PostgreSQL")
    assert set(stack.up.seen.values()) == set(SERVICES)
    assert stack.up.left_running() == {}
    await stack.pg.stop()
    assert stack.pg.left_running() == []
