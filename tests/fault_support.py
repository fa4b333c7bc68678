"""What the fault suite (tests/test_faults.py) drives and watches.

* `RestartablePostgres`: the embedded PostgreSQL (pgserver) started by the
  test, so the test can crash it (`pg_ctl stop -m immediate`: every backend
  dies without a checkpoint, crash recovery on the next start) and start it
  again on the same data directory and socket -- the same DSN.
* `Supervised`: `inferswarm up` as a subprocess, and its process tree read
  from /proc (psutil): each child's name comes from its `INFERSWARM_NODE_NAME`,
  so a restarted child is found by name whatever its new pid. Every pid ever
  seen is remembered, to prove at the end that none is left.
* `Load`: steady, bounded load over the project's own mesh client -- a fixed
  number of loops, each one request at a time with a deadline -- recording
  every request (`Call`): its unique prompt (so its usage record can be found
  by prompt hash even when the client never learnt its request id), outcome,
  request id and times.
* `recovery()`: when, after a fault, the load was served again.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from shared.db import EmbeddedPostgres
from shared.dht import service_topic
from shared.errors import MeshError
from shared.runner import MeshNode
from stack import alive, read_ready, start_up

#: pgserver's PostgreSQL binaries, found without importing pgserver.
POSTGRES_BIN = Path(importlib.util.find_spec("pgserver").origin).parent / "pginstall" / "bin"  # type: ignore[union-attr, arg-type]

__all__ = ["RestartablePostgres", "Supervised", "Call", "Load", "SLOW", "Recovery", "recovery", "observe",
           "settled", "running", "prompt_hash", "fetch", "count_by"]


# -- PostgreSQL ----------------------------------------------------------------------------


class RestartablePostgres:
    """The embedded server, which the test may crash and start again."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server = EmbeddedPostgres(pgdata, cleanup_mode="delete")
        self.dsn = ""
        #: Every postmaster and backend process seen, for the leak check.
        self.processes: dict[int, psutil.Process] = {}

    async def start(self) -> str:
        self.dsn = await self._server.start()
        self._start_args = self._pg_ctl_start_args()
        self.remember_pids()
        return self.dsn

    def postmaster(self) -> int | None:
        """The running server's pid, from postmaster.pid (None when stopped)."""
        path = self.pgdata / "postmaster.pid"
        try:
            return int(path.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def remember_pids(self) -> None:
        pid = self.postmaster()
        if pid is None or not alive(pid):
            return
        try:
            postmaster = psutil.Process(pid)
            for process in [postmaster, *postmaster.children(recursive=True)]:
                self.processes.setdefault(process.pid, process)
        except psutil.NoSuchProcess:
            pass

    def left_running(self) -> list[int]:
        return [pid for pid, process in self.processes.items() if running(process)]

    def _pg_ctl_start_args(self) -> list[str]:
        """What pgserver started the server with: no TCP, the same socket directory."""
        lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        socket_dir = lines[4].strip()
        return ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.pgdata / "log"), "start"]

    def _pg_ctl(self, *args: str) -> None:
        # As root, pgserver runs PostgreSQL as its own system user; so must we.
        user = "pgserver" if os.geteuid() == 0 else None
        subprocess.run([str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.pgdata), *args],
                       check=True, capture_output=True, timeout=30, user=user)

    async def crash(self) -> None:
        """Immediate shutdown: the postmaster kills every backend at once (no
        checkpoint, clients' connections cut); the next start runs crash recovery."""
        self.remember_pids()
        await asyncio.to_thread(self._pg_ctl, "stop", "-m", "immediate", "-w")

    async def start_again(self) -> None:
        """Start it as pgserver did: same data directory, same socket, so the same DSN."""
        await asyncio.to_thread(self._pg_ctl, *self._start_args)
        self.remember_pids()

    async def stop(self) -> None:
        """Stop the server (ours, whichever start it was) and delete its data."""
        self.remember_pids()
        pid = self.postmaster()
        if pid is not None and alive(pid):
            await asyncio.to_thread(self._pg_ctl, "stop", "-m", "fast", "-w")
        await self._server.stop()


# -- inferswarm up -----------------------------------------------------------------------------


class Supervised:
    """`inferswarm up --json` and its children, found by name in its process tree."""

    def __init__(self, data_dir: Path, dht_port: int, *extra: str, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.proc = start_up(data_dir, dht_port, *extra, env=env)
        self.ready: dict[str, Any] = {}
        #: Every descendant of `up` ever seen: pid -> name.
        self.seen: dict[int, str] = {}
        self._processes: dict[int, psutil.Process] = {}
        #: What `up` said on stderr (restarts), read as it comes so the pipe never fills.
        self.said: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.said.append(line.rstrip())

    def wait_ready(self) -> dict[str, Any]:
        self.ready = read_ready(self.proc)
        self.children()
        return self.ready

    def children(self) -> dict[str, list[psutil.Process]]:
        """Every descendant of `up` now, by name (zombies included: they are a fault too)."""
        by_name: dict[str, list[psutil.Process]] = {}
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return by_name
        for process in descendants:
            name = _child_name(process)
            if name is None:
                continue  # exited between the listing and the look
            self.seen[process.pid] = name
            self._processes.setdefault(process.pid, process)
            by_name.setdefault(name, []).append(process)
        return by_name

    def problems(self, expected: Iterable[str]) -> list[str]:
        """What is wrong with the tree now: a service missing, twice, or a zombie."""
        found = self.children()
        wrong = []
        for name in expected:
            processes = found.pop(name, [])
            states = [_status(p) for p in processes]
            if len(processes) != 1 or states[0] == psutil.STATUS_ZOMBIE:
                wrong.append(f"{name}: {[(p.pid, s) for p, s in zip(processes, states)]}")
        wrong += [f"unexpected {name}: {[p.pid for p in ps]}" for name, ps in found.items()]
        return wrong

    def pid_of(self, name: str) -> int:
        processes = self.children().get(name, [])
        assert len(processes) == 1, f"{name}: {len(processes)} processes under up"
        return processes[0].pid

    def ready_lines(self, name: str) -> list[dict[str, Any]]:
        """Every "service ready" event in the child's log, one per start: pid, endpoint."""
        found = []
        with open(self.data_dir / "logs" / f"{name}.log", "rb") as log:
            for line in log:
                if b'"service ready"' in line:
                    try:
                        found.append(json.loads(line))
                    except ValueError:
                        continue
        return found

    def ready_line(self, name: str) -> dict[str, Any] | None:
        """The latest start's ready event."""
        return (self.ready_lines(name) or [None])[-1]

    def names_by_endpoint(self, names: Iterable[str]) -> dict[str, str]:
        """Every endpoint any start of these children listened on -> the child's name."""
        return {ready["endpoint"]: name for name in names for ready in self.ready_lines(name)}

    async def wait_restarted(self, name: str, old_pid: int, timeout: float) -> dict[str, Any]:
        """The ready event of `name`'s next incarnation, once it is the one child of that name."""
        deadline = time.monotonic() + timeout
        while True:
            ready = self.ready_line(name)
            if (ready is not None and ready.get("pid") != old_pid and alive(ready["pid"])
                    and [p.pid for p in self.children().get(name, [])] == [ready["pid"]]):
                return ready
            assert time.monotonic() < deadline, f"{name} was not restarted within {timeout} s"
            await asyncio.sleep(0.05)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to up, as Ctrl-C would; kill -9 whatever is left after `timeout`."""
        self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            return self.proc.wait(10)

    def left_running(self) -> dict[int, str]:
        """Which of the processes ever seen still run (the same processes: psutil
        checks the start time, so a pid reused by someone else does not count)."""
        return {pid: self.seen[pid] for pid, process in self._processes.items() if running(process)}

    def kill_everything(self) -> None:
        """Leave nothing behind, even after a failure: every process we saw, then up."""
        for pid, process in self._processes.items():
            if running(process):
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def running(process: psutil.Process) -> bool:
    """Still this process (not a reused pid), and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _child_name(process: psutil.Process) -> str | None:
    try:
        name = process.environ().get("INFERSWARM_NODE_NAME")
        if name is None and "shared.dht" in process.cmdline():
            name = "bootstrap"
        return name or f"pid-{process.pid}"
    except psutil.ZombieProcess:
        return f"zombie-{process.pid}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _status(process: psutil.Process) -> str:
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return "gone"


# -- the load ----------------------------------------------------------------------------------


def prompt_hash(prompt: str) -> str:
    """What the gateway keeps of a `prompt` (services/gateway/checks.py)."""
    return hashlib.sha256(prompt.encode()).hexdigest()


@dataclass
class Call:
    """One `gateway.infer` request and how it ended, from the client's side."""

    client: str
    prompt: str
    started: float  #: time.monotonic()
    started_at: float  #: time.time(), for the limit's UTC window
    ended: float = 0.0
    status: str = "pending"  #: "ok" or the error code
    request_id: str | None = None
    text_chunks: int = 0
    worker: str | None = None
    gateway: str | None = None  #: the endpoint, when the client chose the gateway
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Load:
    """Steady bounded load: `loops` clients, one request at a time each.

    The steady loops use `gateway.infer` through the mesh client (it picks a
    gateway on load and fails over when one cannot be reached), as any CLI
    does; the limited loops each stick to one gateway (by their sorted
    endpoints), so the limit is spent through both.
    """

    mesh: MeshNode
    model: str
    words: int  #: words per prompt: the answer's length with the echo backend
    deadline: float  #: every request's timeout
    calls: list[Call] = field(default_factory=list)
    _tasks: dict[str, list[asyncio.Task[None]]] = field(default_factory=dict)
    _stops: dict[str, asyncio.Event] = field(default_factory=dict)
    _sequence: int = 0

    def start(self, group: str, api_key: str, loops: int, *, pause: float, pinned: bool = False) -> None:
        """`loops` clients named `<group>-<i>`, `pause` seconds between one's requests."""
        stop = self._stops.setdefault(group, asyncio.Event())
        tasks = self._tasks.setdefault(group, [])
        for index in range(loops):
            pin = index if pinned else None
            tasks.append(asyncio.create_task(self._loop(f"{group}-{index}", api_key, pin, pause, stop)))

    async def stop(self, group: str) -> None:
        self._stops[group].set()
        tasks = self._tasks.pop(group, [])
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop_all(self) -> None:
        for group in list(self._tasks):
            await self.stop(group)

    def of(self, group: str) -> list[Call]:
        return [c for c in self.calls if c.client.startswith(group + "-")]

    async def _loop(self, client: str, api_key: str, pin: int | None, pause: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            call = await self._one(client, api_key, pin)
            try:  # a quick failure (nobody reachable) must not become a hot loop
                await asyncio.wait_for(stop.wait(), pause if call.ok else max(pause, 0.1))
            except TimeoutError:
                pass

    def _prompt(self, client: str) -> str:
        self._sequence += 1  # unique: the usage record is found by its hash
        return " ".join([f"{client}-{self._sequence}", *(f"w{i}" for i in range(self.words - 1))])

    async def _one(self, client: str, api_key: str, pin: int | None) -> Call:
        prompt = self._prompt(client)
        call = Call(client, prompt, time.monotonic(), time.time())
        self.calls.append(call)
        params = {"api_key": api_key, "model": self.model, "prompt": prompt, "max_tokens": self.words}
        try:
            stream = await self._open(call, params, pin)
            async with stream:
                async for chunk in stream:
                    if isinstance(chunk.get("text"), str):
                        call.text_chunks += 1
                    if chunk.get("done"):
                        call.request_id = chunk.get("request_id")
                        call.worker = (chunk.get("worker") or {}).get("id")
                        call.status = "ok"
        except MeshError as exc:
            call.status, call.message = exc.code, exc.message
            call.request_id = exc.data.get("request_id") if isinstance(exc.data, dict) else None
        except Exception as exc:  # counted as a failure, not a dead client loop
            call.status, call.message = type(exc).__name__, str(exc)
        if call.status == "pending":
            call.status = "NO_FINAL_CHUNK"
        call.ended = time.monotonic()
        return call

    async def _open(self, call: Call, params: dict[str, Any], pin: int | None) -> Any:
        if pin is None:
            return await self.mesh.mesh("gateway").stream("gateway.infer", params, timeout=self.deadline)
        providers = sorted(await self.mesh.discovery.lookup(service_topic("gateway")), key=lambda p: p.endpoint)
        provider = providers[pin % len(providers)]
        call.gateway = provider.endpoint
        return await self.mesh.mesh.connection(provider).stream("gateway.infer", params, timeout=self.deadline)


# -- measuring ---------------------------------------------------------------------------------


#: A request slower than this was not served normally: a stream here takes
#: ~0.3 s, ~1 s on a busy machine; a request stalled by a fault takes seconds.
SLOW = 2.5


@dataclass(frozen=True)
class Recovery:
    """How the load fared from a fault until `until`."""

    seconds: float  #: from the fault until served again (0: no request was hurt)
    failed: int  #: requests started after the fault that failed
    slow: int  #: ... that succeeded, but slower than `SLOW`
    served: int  #: ... that succeeded in time
    errors: dict[str, int]
    last_bad: float  #: when the last failed or slow one started (`since` if none)


def recovery(calls: list[Call], since: float, until: float) -> Recovery:
    """Requests started in [since, until), all finished: when was the load served again?

    A request is hurt by the fault if it failed or took longer than `SLOW`.
    Served again is the end of the first request served in time that started
    after the last hurt one; with none hurt, 0 s. Requests in flight at the
    fault started before it and do not count (they are the "streams cut").
    """
    after = [c for c in calls if since <= c.started < until]
    assert all(c.status != "pending" for c in after), "measure finished requests only"
    good = [c for c in after if c.ok and c.ended - c.started <= SLOW]
    bad = [c for c in after if not (c.ok and c.ended - c.started <= SLOW)]
    errors = count_by([c for c in bad if not c.ok], lambda c: c.status)
    failed = sum(errors.values())
    if not bad:
        return Recovery(0.0, 0, 0, len(good), errors, since)
    last = max(c.started for c in bad)
    later = [c.ended for c in good if c.started > last]
    seconds = (min(later) if later else float("inf")) - since
    return Recovery(seconds, failed, len(bad) - failed, len(good), errors, last)


async def observe(load: Load, group: str, since: float, *, quiet: float, timeout: float) -> Recovery:
    """Watch `group`'s requests from `since` until they have been served in
    time for `quiet` seconds (every request started in them finished, none
    hurt), or `timeout` seconds; what `recovery` says of them."""
    deadline = since + timeout
    while True:
        await asyncio.sleep(0.25)
        now = time.monotonic()
        await settled(load, before=now)
        measured = recovery(load.of(group), since, now)
        if now - measured.last_bad >= quiet and measured.seconds != float("inf") and now - since >= quiet:
            return measured
        if now >= deadline:
            return measured


async def settled(load: Load, before: float, timeout: float = 15.0) -> None:
    """Wait until every request started before `before` has ended (each has a deadline)."""
    deadline = time.monotonic() + timeout
    while any(c.status == "pending" and c.started < before for c in load.calls):
        assert time.monotonic() < deadline, "requests still pending long after their deadline"
        await asyncio.sleep(0.05)


async def fetch(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


def count_by(items: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for item in items:
        counts[key(item)] = counts.get(key(item), 0) + 1
    return counts
