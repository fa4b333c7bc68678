"""Supervised child processes: start, wait until ready, restart, stop.

Each child prints one JSON line on stdout when it is ready (the DHT node
`{"dht": ...}`, a service `{"ready": ...}`); its logs (stderr) go to a file
of its own under `<data_dir>/logs/`. A child that exits on its own is
restarted with exponential backoff and the event is logged; `stop()` sends
SIGTERM to every child (newest first), then SIGKILL to any still running after
the grace period, so no orphan is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

__all__ = ["ChildSpec", "Child", "Supervisor", "ChildFailed"]

log = structlog.get_logger(__name__)


class ChildFailed(RuntimeError):
    """A child exited or stayed silent before it said it was ready."""


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child: its name, command line and extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: Children stop in groups, highest first; a group stops concurrently.
    stop_group: int = 0
    #: Variables of our own environment the child must not inherit.
    unset: tuple[str, ...] = ()


class Child:
    """One running child process and what it said when it became ready."""

    def __init__(self, spec: ChildSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.name}.log"
        self.process: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.restarts = 0
        self._stdout_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout: float) -> dict[str, Any]:
        """Start the process and wait for its readiness line."""
        with open(self.log_path, "ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *self.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**{k: v for k, v in os.environ.items() if k not in self.spec.unset}, **self.spec.env},
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
            )
        try:
            self.ready = await asyncio.wait_for(self._read_ready(), timeout)
        except (TimeoutError, ChildFailed) as exc:
            await self.stop(grace=2.0)
            raise ChildFailed(f"{self.spec.name} did not become ready: {exc or 'timed out'} "
                              f"(see {self.log_path})") from None
        self._stdout_task = asyncio.create_task(self._drain_stdout())
        return self.ready

    async def _read_ready(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            if not line:
                code = await self.process.wait()
                raise ChildFailed(f"exited with status {code}")
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and ("ready" in message or "dht" in message):
                return message

    async def _drain_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while await self.process.stdout.readline():
            pass

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps the process."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            log.warning("child ignored SIGTERM; killing", child=self.spec.name, pid=process.pid)
            process.kill()
            await process.wait()
        if self._stdout_task is not None:
            self._stdout_task.cancel()


class Supervisor:
    """Start children in order, keep them running, stop them in reverse."""

    def __init__(self, log_dir: Path, *, ready_timeout: float = 90.0, max_backoff: float = 30.0) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self._ready_timeout = ready_timeout
        self._max_backoff = max_backoff
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self, spec: ChildSpec) -> Child:
        child = Child(spec, self.log_dir)
        await child.start(self._ready_timeout)
        self.children.append(child)
        self._watchers.append(asyncio.create_task(self._watch(child)))
        log.info("child ready", child=spec.name, pid=child.pid)
        return child

    async def _watch(self, child: Child) -> None:
        backoff = 1.0
        while not self._stopping:
            assert child.process is not None
            started = time.monotonic()
            code = await child.process.wait()
            if self._stopping:
                return
            if time.monotonic() - started > 60:
                backoff = 1.0  # it ran well for a while: start the backoff over
            log.error("child exited; restarting", child=child.spec.name, status=code, in_seconds=backoff)
            print(f"inferswarm: {child.spec.name} exited with status {code}; restarting in {backoff:.0f}s",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
            try:
                await child.start(self._ready_timeout)
                child.restarts += 1
            except ChildFailed as exc:
                log.error("restart failed", child=child.spec.name, error=str(exc))

    async def stop(self) -> None:
        """Stop every child, group by group (highest `stop_group` first, each
        group at once); no process is left behind."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        for group in sorted({c.spec.stop_group for c in self.children}, reverse=True):
            await asyncio.gather(*(c.stop() for c in self.children if c.spec.stop_group == group))
