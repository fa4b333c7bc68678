"""The CLI as a script meets it: `inferswarm` commands in a loop, at once, and lookups among the dead.

    .venv/bin/python bench/cli.py [--sequential 200] [--concurrent 64] [--lookups 200]

A local stack, as a user starts it (`inferswarm up --models FILE`, the echo
backend serving `smollm2` with 256 slots), in a temporary directory with its
own XDG config and cache directories (removed at the end). Every command is a
real `inferswarm` process started from a scratch directory, as a shell
script would start it. Then:

1. baseline: `inferswarm --help` (the process start and imports, no network);
2. `--sequential` `inferswarm models --json` one after the other: p50, p99,
   and `drift`, the p50 of the last 50 over the p50 of the first 50 (the mesh
   degrading as clients come and go would show here);
3. `--concurrent` `inferswarm infer hi --no-stream --max-tokens 1 --json` at
   once: failures by error code (the exit code says which);
4. `--lookups` DHT lookups of the gateway's topic, each by a fresh read-only
   node (as the CLI starts one) against the stack's DHT nodes: first as they
   are (`lookup_p50_ms`), then with dead contacts planted in every routing
   table -- "ghost" full nodes that ping every stack node, so each adds them,
   then vanish -- 30% of each table, the lookups running in the 3 s after
   each planting, before the stack's own liveness pings drop them
   (`lookup_dead_p50_ms`; `lookup_dead_met_mean` says how many dead contacts
   each lookup met and gave up on).

Targets (issue 14): p50 <= 0.5 s, p99 <= 0.8 s, drift <= 1.1, no TIMEOUT or
UNAVAILABLE at 64 at once, lookup_dead_p50_ms <= 10. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inferswarm.errors import EXIT_CODES  # noqa: E402
from shared.dht import DHTConfig, KademliaDiscovery, service_topic  # noqa: E402
from shared.identity import MeshId, NodeIdentity  # noqa: E402

PASSWORD = "benchmark passphrase, long enough"
CATALOG = {"smollm2": {"backend": "echo", "slots": 256, "queue": 1024}}
CODES = {code: name for name, code in EXIT_CODES.items()}
DEAD_FRACTION = 0.3
#: Lookups run this long after a planting: less than the stack's liveness
#: interval (5 s), so the ghosts are still in every table.
PLANTED_WINDOW = 3.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """`inferswarm up --json` with its own data, config and cache directories."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")}
        self.env.update(XDG_CONFIG_HOME=str(root / "config"), XDG_CACHE_HOME=str(root / "cache"),
                        INFERSWARM_LOG_LEVEL="warning")
        self.scratch = root / "scratch"  # where the commands run: not the repo, not the data
        self.scratch.mkdir()
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}

    def start(self) -> dict[str, Any]:
        models = self.root / "models.json"
        models.write_text(json.dumps(CATALOG))
        with open(self.root / "up.log", "w") as log:
            self.proc = subprocess.Popen(
                [str(ROOT / ".venv/bin/inferswarm"), "up", "--json", "--data-dir", str(self.root / "data"),
                 "--models", str(models), "--dht-port", str(free_port(socket.SOCK_DGRAM)),
                 "--web-port", str(free_port(socket.SOCK_STREAM)),
                 "--metrics-port", str(free_port(socket.SOCK_STREAM))],
                cwd=self.scratch, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise SystemExit(f"inferswarm up failed:\n{(self.root / 'up.log').read_text()[-3000:]}")
        self.ready = json.loads(line)
        return self.ready

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def cli(self, *args: str, stdin: str | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Run one `inferswarm` command as a script would; (seconds, result)."""
        began = time.perf_counter()
        result = subprocess.run([str(ROOT / ".venv/bin/inferswarm"), *args], input=stdin, capture_output=True,
                                text=True, cwd=self.scratch, env=self.env, timeout=120)
        return time.perf_counter() - began, result

    async def cli_async(self, *args: str) -> tuple[float, int, str]:
        began = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            str(ROOT / ".venv/bin/inferswarm"), *args, cwd=self.scratch, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        return time.perf_counter() - began, proc.returncode or 0, err.decode()[-300:]


def must(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(result.args[1:3])} failed ({result.returncode}): {result.stderr.strip()}")


def sign_up(stack: Stack) -> None:
    must(stack.cli("register", "bench", "bench@example.org", "--password-stdin", stdin=PASSWORD)[1])
    must(stack.cli("login", "bench", "--password-stdin", stdin=PASSWORD)[1])
    must(stack.cli("keys", "create", "bench")[1])


def sequential(stack: Stack, count: int) -> dict[str, Any]:
    seconds, failures = [], 0
    for _ in range(count):
        took, result = stack.cli("models", "--json")
        seconds.append(took)
        failures += result.returncode != 0
    half = min(50, count // 2)
    first, last = statistics.median(seconds[:half]), statistics.median(seconds[-half:])
    return {"p50_s": round(statistics.median(seconds), 3), "p99_s": round(percentile(seconds, 0.99), 3),
            "max_s": round(max(seconds), 3), "first50_p50_s": round(first, 3), "last50_p50_s": round(last, 3),
            "drift": round(last / first, 3), "failures_sequential": failures}


async def concurrent(stack: Stack, count: int) -> dict[str, Any]:
    runs = await asyncio.gather(*(stack.cli_async("infer", "hi", "--no-stream", "--max-tokens", "1", "--json")
                                  for _ in range(count)))
    failures = Counter(CODES.get(code, f"exit {code}") for _, code, _ in runs if code != 0)
    samples = [err.strip() for _, code, err in runs if code != 0][:3]
    seconds = [took for took, _, _ in runs]
    return {"failures_64": dict(failures), "concurrent_wall_s": round(max(seconds), 3),
            "concurrent_p50_s": round(statistics.median(seconds), 3), "failure_samples": samples}


class Ghosts:
    """Full DHT "nodes" that introduce themselves to every stack node, then vanish."""

    def __init__(self, targets: list[tuple[str, int]]) -> None:
        self.targets = targets
        self.ids: list[bytes] = []

    def plant(self, count: int) -> None:
        for _ in range(count):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("127.0.0.1", 0))
                sock.settimeout(1.0)
                ghost_id = os.urandom(20)
                self.ids.append(ghost_id)
                for target in self.targets:
                    sock.sendto(b"\x00" + os.urandom(20) + msgpack.packb(["ping", [ghost_id]]), target)
                for _ in self.targets:  # every node answered: each has added the ghost
                    sock.recvfrom(1024)
            # closed: from now on nothing answers at the ghost's address


async def lookups(stack: Stack, count: int) -> dict[str, Any]:
    mesh_id = MeshId.from_text(stack.ready["mesh_id"])
    config = DHTConfig(cache_ttl=0)
    seed = stack.ready["bootstrap"]

    async def one(ghosts: list[bytes]) -> tuple[float, int, int]:
        """A fresh read-only node's lookup: (seconds, ghosts it gave up on, providers)."""
        async with KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh_id, seeds=[seed], config=config,
                                     read_only=True) as node:
            began = time.perf_counter()
            providers = await node.lookup(service_topic("gateway"))
            took = time.perf_counter() - began
            met = sum(1 for ghost in ghosts if node.server.protocol.is_dead(ghost))
            return took, met, len(providers)

    async with KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh_id, seeds=[seed], config=config,
                                 read_only=True) as scout:
        await scout.lookup(service_topic("gateway"))
        targets = [(c.ip, c.port) for c in scout.server.protocol.contacts()]
    clean = [await one([]) for _ in range(count)]
    ghosts = Ghosts(targets)
    per_table = max(1, round(len(targets) * DEAD_FRACTION / (1 - DEAD_FRACTION)))
    dirty: list[tuple[float, int, int]] = []
    while len(dirty) < count:
        # One planting at a time, so that the tables hold 30% dead and no more:
        # wait until the stack's liveness pings have dropped the last ghosts.
        settle = time.monotonic() + 30
        while ghosts.ids and (await one(ghosts.ids))[1] and time.monotonic() < settle:
            await asyncio.sleep(0.5)
        ghosts.ids.clear()
        ghosts.plant(per_table)
        window = time.monotonic() + PLANTED_WINDOW
        while len(dirty) < count and time.monotonic() < window:
            dirty.append(await one(ghosts.ids))
    ms = [took * 1000 for took, _, _ in dirty]
    return {"lookup_p50_ms": round(statistics.median(t * 1000 for t, _, _ in clean), 2),
            "lookup_dead_p50_ms": round(statistics.median(ms), 2), "lookup_dead_p99_ms": round(percentile(ms, 0.99), 2),
            "lookup_dead_met_mean": round(statistics.mean(met for _, met, _ in dirty), 2),
            "stack_dht_nodes": len(targets), "ghosts_per_planting": per_table,
            "lookup_missing_providers": sum(1 for _, _, n in dirty if n == 0)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    stack = Stack(root)
    try:
        began = time.perf_counter()
        ready = stack.start()
        print(f"stack up in {time.perf_counter() - began:.1f} s ({len(ready['children'])} processes)", flush=True)
        sign_up(stack)
        help_s = [stack.cli("--help")[0] for _ in range(10)]
        result: dict[str, Any] = {"help_p50_s": round(statistics.median(help_s), 3)}
        print(f"baseline `inferswarm --help`: p50 {result['help_p50_s']:.3f} s", flush=True)
        result.update(sequential(stack, args.sequential))
        print(f"{args.sequential} sequential `models --json`: p50 {result['p50_s']:.3f} s, "
              f"p99 {result['p99_s']:.3f} s, "
              f"first 50 {result['first50_p50_s']:.3f} s, last 50 {result['last50_p50_s']:.3f} s "
              f"(drift {result['drift']:.2f}), {result['failures_sequential']} failed", flush=True)
        result.update(await concurrent(stack, args.concurrent))
        print(f"{args.concurrent} concurrent `infer`: failures {result['failures_64'] or 'none'}, "
              f"all done in {result['concurrent_wall_s']:.2f} s", flush=True)
        for sample in result.pop("failure_samples"):
            print(f"  e.g. {sample}")
        result.update(await lookups(stack, args.lookups))
        print(f"lookups by fresh read-only nodes: p50 {result['lookup_p50_ms']:.2f} ms; with ~30% dead contacts "
              f"planted: p50 {result['lookup_dead_p50_ms']:.2f} ms, p99 {result['lookup_dead_p99_ms']:.2f} ms "
              f"({result['lookup_dead_met_mean']:.1f} dead contacts met and given up on per lookup)", flush=True)
        return result
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--lookups", type=int, default=200)
    return parser.parse_args()


if __name__ == "__main__":
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    print(json.dumps(asyncio.run(main(parse_args()))))
