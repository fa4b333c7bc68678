"""Auth benchmark: `auth.validate_key` over RPC beside the raw echo baseline of bench/rpc.py.

    .venv/bin/python bench/auth.py [--seconds 2] [--rounds 2]

The auth service runs in its own process on a real PostgreSQL (the embedded
server, in a temporary directory), with production Argon2id parameters, behind
its real `RpcServer` (public and internal methods, so per-request membership
checks are on). The client registers, logs in and creates a key over RPC,
then measures `auth.validate_key` at 1, 16 and 64 in flight; the raw pyzmq echo
baseline is measured in the same run with bench/rpc.py's own functions. Rounds
alternate and the best of each is kept. Login cost (Argon2id verify plus the
RPC) is reported too. The last line is JSON with `validate_throughput_ratio_16`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq.asyncio
from nacl.public import PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rpc import LEVELS, bench_kind, best, measure  # noqa: E402  (bench/rpc.py)

from shared.identity import CurveKeyPair  # noqa: E402

PASSWORD = "benchmark passphrase, long enough"


# -- the auth server (a child process) ------------------------------------------


async def serve_auth(spec: dict) -> None:
    from contextlib import AsyncExitStack

    from shared.config import MeshConfig
    from shared.db import EmbeddedPostgres, ensure_database
    from shared.rpc import Dispatcher, RpcServer
    from services.auth.app import open_auth
    from services.auth.config import AuthConfig

    keys = CurveKeyPair(spec["public"].encode(), spec["secret"].encode())
    with tempfile.TemporaryDirectory(prefix="auth-bench-") as tmp:
        async with AsyncExitStack() as stack:
            server_pg = await stack.enter_async_context(
                EmbeddedPostgres(Path(tmp) / "pgdata", cleanup_mode="delete"))
            dsn = await ensure_database(server_pg.dsn, "auth")
            config = AuthConfig(mesh=MeshConfig(data_dir=Path(tmp) / "data"))  # production argon2
            service = await open_auth(stack, config, dsn)
            server = RpcServer(Dispatcher(service), curve=keys, members={spec["client"].encode(): "operator"})
            await stack.enter_async_context(server)
            print(json.dumps({"endpoint": server.endpoint}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # until the parent closes our stdin


def run_server() -> None:
    spec = json.loads(sys.stdin.readline())
    import logging

    import structlog

    logging.disable(logging.INFO)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(serve_auth(spec))


def start_auth(server: CurveKeyPair, client: CurveKeyPair) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    spec = {"public": server.public.decode(), "secret": server.secret.decode(),
            "client": client.public.decode()}
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the auth server did not start (exit {proc.wait()})")
    return proc, json.loads(line)["endpoint"]


def stop(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=10)


# -- clients ----------------------------------------------------------------------


class ValidateClient:
    """`measure()`'s client interface (`call(value)`), calling auth.validate_key."""

    def __init__(self, connection, api_key: str) -> None:
        self.connection = connection
        self.params = {"api_key": api_key}

    async def call(self, _value: str) -> dict:
        return await self.connection.call("auth.validate_key", self.params, timeout=10.0)


async def login_cost(connection, username: str, n: int = 8) -> dict:
    """Sequential logins (one Argon2id verify each, plus RPC and SQL), and 4 at once (one account takes
    at most 6 unproven attempts at a time: services/auth/throttle.py)."""
    params = {"username_or_email": username, "password": PASSWORD}
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await connection.call("auth.login", params, timeout=30.0)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    await asyncio.gather(*(connection.call("auth.login", params, timeout=30.0) for _ in range(4)))
    return {"p50_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000,
            "per_s_4_concurrent": 4 / (time.perf_counter() - start)}


class AuthProcess:
    """The auth server process and a member connection to it, with a key to validate."""

    async def __aenter__(self) -> AuthProcess:
        from shared.rpc import Connection

        server = CurveKeyPair.from_private(PrivateKey.generate())
        member = CurveKeyPair.from_private(PrivateKey.generate())
        self.proc, endpoint = start_auth(server, member)
        self.ctx = zmq.asyncio.Context()
        self.connection = Connection(endpoint, server.public, member, context=self.ctx)
        self.connection.open()
        self.user = f"bench{os.getpid()}"
        await self.connection.call("auth.register", {
            "username": self.user, "email": f"{self.user}@example.com", "password": PASSWORD}, timeout=30.0)
        login = await self.connection.call(
            "auth.login", {"username_or_email": self.user, "password": PASSWORD}, timeout=30.0)
        created = await self.connection.call("auth.create_key", {"token": login["token"], "name": "bench"})
        self.client = ValidateClient(self.connection, created["api_key"])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.connection.close()
        self.ctx.destroy(linger=0)
        stop(self.proc)

    async def measure(self, seconds: float) -> dict:
        return {level: await measure(self.client, level, seconds) for level in LEVELS}


async def main(seconds: float, rounds: int) -> None:
    raw_rounds, validate_rounds = [], []
    async with AuthProcess() as auth:
        for _ in range(rounds):  # alternate, as bench/rpc.py does: these machines are noisy
            raw_rounds.append(await bench_kind("raw", seconds))
            validate_rounds.append(await auth.measure(seconds))
        login = await login_cost(auth.connection, auth.user)
    raw, validate = best(raw_rounds), best(validate_rounds)
    print(f"{'in flight':>9} | {'raw echo p50 µs':>15} {'p99 µs':>8} {'req/s':>8} | "
          f"{'validate_key p50 µs':>19} {'p99 µs':>8} {'req/s':>8}")
    for level in LEVELS:
        r, v = raw[level], validate[level]
        print(f"{level:>9} | {r['p50_us']:>15.0f} {r['p99_us']:>8.0f} {r['rps']:>8.0f} | "
              f"{v['p50_us']:>19.0f} {v['p99_us']:>8.0f} {v['rps']:>8.0f}")
    print(f"login (Argon2id t=3 m=64MiB p=4, over RPC): p50 {login['p50_ms']:.0f} ms, "
          f"max {login['max_ms']:.0f} ms, {login['per_s_4_concurrent']:.1f} logins/s with 4 at once")
    summary = {
        "validate_throughput_ratio_16": round(validate[16]["rps"] / raw[16]["rps"], 3),
        "validate_throughput_ratio_64": round(validate[64]["rps"] / raw[64]["rps"], 3),
        "validate_p50_us_1": round(validate[1]["p50_us"], 1),
        "validate_p50_us_16": round(validate[16]["p50_us"], 1),
        "validate_p99_us_16": round(validate[16]["p99_us"], 1),
        "validate_rps_16": round(validate[16]["rps"], 1),
        "raw_rps_16": round(raw[16]["rps"], 1),
        "login_p50_ms": round(login["p50_ms"], 1),
        "login_per_s_4_concurrent": round(login["per_s_4_concurrent"], 2),
    }
    print(f"target: validate_throughput_ratio_16 >= 0.70 (got {summary['validate_throughput_ratio_16']})")
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.serve:
        run_server()
    else:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        asyncio.run(main(args.seconds, args.rounds))
