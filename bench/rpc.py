"""RPC benchmark: our RPC against a raw pyzmq baseline, in the same run.

    .venv/bin/python bench/rpc.py [--seconds 2] [--rounds 2]

(a) raw: zmq.asyncio DEALER/ROUTER, CURVE on, msgpack, an echo handler,
    ~200-byte payload -- the least code that does the same job;
(b) ours: `RpcServer` + `Connection` calling an `@method` echo;
(c) roles: the same, the echo serving one member role only, so the server
    reads each caller's key from the frame and checks its role (the path of
    every service's server since roles: shared/roles.py).
Each server runs in its own process (as in production); the client measures
p50/p99 latency and throughput at 1, 16 and 64 requests in flight. Rounds
alternate raw/ours and the best round of each is kept, because these machines
are noisy. Also reports DHT announce/lookup latency across 5 nodes.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio
from nacl.public import PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.identity import CurveKeyPair  # noqa: E402

PAYLOAD = "x" * 200
LEVELS = (1, 16, 64)


# -- servers (run in a child process) ----------------------------------------


async def serve_raw(keys: CurveKeyPair) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"endpoint": f"tcp://127.0.0.1:{port}"}), flush=True)
    while True:
        ident, data = await sock.recv_multipart()
        request_id, value = msgpack.unpackb(data)
        await sock.send_multipart([ident, msgpack.packb([request_id, value])])


async def serve_ours(keys: CurveKeyPair, client_public: bytes, roles: bool) -> None:
    from shared.rpc import Dispatcher, RpcServer, method

    class Echo:
        name = "bench"

        @method
        async def echo(self, value: str) -> str:
            return value

    class GatewaysEcho:
        name = "bench"

        @method(roles=("gateway",))
        async def echo(self, value: str) -> str:
            return value

    service = GatewaysEcho() if roles else Echo()
    server = RpcServer(Dispatcher(service), curve=keys, members={client_public: "gateway"})
    await server.start()
    print(json.dumps({"endpoint": server.endpoint}), flush=True)
    await asyncio.Event().wait()


def run_server(kind: str) -> None:
    spec = json.loads(sys.stdin.readline())
    keys = CurveKeyPair(spec["public"].encode(), spec["secret"].encode())
    import logging

    logging.disable(logging.INFO)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    coro = serve_raw(keys) if kind == "raw" else serve_ours(keys, spec["client"].encode(), kind == "roles")
    asyncio.run(coro)


# -- clients -----------------------------------------------------------------


class RawClient:
    """The baseline client: one DEALER, replies matched to futures by id."""

    def __init__(self, endpoint: str, server_key: bytes, keys: CurveKeyPair) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.curve_serverkey = server_key
        self.sock.curve_publickey, self.sock.curve_secretkey = keys.public, keys.secret
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.ids = itertools.count()
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            request_id, value = msgpack.unpackb(await self.sock.recv())
            self.pending.pop(request_id).set_result(value)

    async def call(self, value: str) -> str:
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        await self.sock.send(msgpack.packb([request_id, value]))
        return await future

    async def close(self) -> None:
        self.reader.cancel()
        self.sock.close()
        self.ctx.term()


class OurClient:
    def __init__(self, endpoint: str, server_key: bytes, keys: CurveKeyPair) -> None:
        from shared.rpc import Connection

        self.ctx = zmq.asyncio.Context()
        self.conn = Connection(endpoint, server_key, keys, context=self.ctx)
        self.conn.open()

    async def call(self, value: str) -> str:
        return await self.conn.call("bench.echo", {"value": value}, timeout=10.0)

    async def close(self) -> None:
        await self.conn.close()
        self.ctx.term()


async def measure(client, in_flight: int, seconds: float) -> dict:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await client.call(PAYLOAD)
            latencies.append(time.perf_counter() - start)

    for _ in range(200):  # warm up
        await client.call(PAYLOAD)
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
    }


def start_server(kind: str, server: CurveKeyPair, client: CurveKeyPair) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    spec = {"public": server.public.decode(), "secret": server.secret.decode(), "client": client.public.decode()}
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    endpoint = json.loads(proc.stdout.readline())["endpoint"]
    return proc, endpoint


async def bench_kind(kind: str, seconds: float) -> dict:
    server = CurveKeyPair.from_private(PrivateKey.generate())
    client_keys = CurveKeyPair.from_private(PrivateKey.generate())
    proc, endpoint = start_server(kind, server, client_keys)
    try:
        client_cls = RawClient if kind == "raw" else OurClient
        client = client_cls(endpoint, server.public, client_keys)
        try:
            return {level: await measure(client, level, seconds) for level in LEVELS}
        finally:
            await client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def best(rounds: list[dict]) -> dict:
    return {level: max((r[level] for r in rounds), key=lambda m: m["rps"]) for level in LEVELS}


async def main(seconds: float, rounds: int, with_dht: bool) -> None:
    runs: dict[str, list[dict]] = {"raw": [], "ours": [], "roles": []}
    for _ in range(rounds):
        for kind, kept in runs.items():
            kept.append(await bench_kind(kind, seconds))
    raw, ours, roles = (best(runs[kind]) for kind in ("raw", "ours", "roles"))
    print(f"{'in flight':>9} | {'raw p50 µs':>10} {'p99 µs':>8} {'req/s':>8} | {'ours p50 µs':>11} {'p99 µs':>8} "
          f"{'req/s':>8} | {'roles p50 µs':>12} {'p99 µs':>8} {'req/s':>8}")
    for level in LEVELS:
        r, o, c = raw[level], ours[level], roles[level]
        print(f"{level:>9} | {r['p50_us']:>10.0f} {r['p99_us']:>8.0f} {r['rps']:>8.0f} | "
              f"{o['p50_us']:>11.0f} {o['p99_us']:>8.0f} {o['rps']:>8.0f} | "
              f"{c['p50_us']:>12.0f} {c['p99_us']:>8.0f} {c['rps']:>8.0f}")
    summary = {
        "throughput_ratio_16": round(ours[16]["rps"] / raw[16]["rps"], 3),
        "throughput_ratio_64": round(ours[64]["rps"] / raw[64]["rps"], 3),
        "p50_ratio_1": round(ours[1]["p50_us"] / raw[1]["p50_us"], 3),
        "roles_vs_ours_64": round(roles[64]["rps"] / ours[64]["rps"], 3),
        "raw": {str(k): {m: round(v, 1) for m, v in raw[k].items()} for k in LEVELS},
        "ours": {str(k): {m: round(v, 1) for m, v in ours[k].items()} for k in LEVELS},
        "roles": {str(k): {m: round(v, 1) for m, v in roles[k].items()} for k in LEVELS},
    }
    if with_dht:
        sys.path.insert(0, str(ROOT / "bench"))
        from dht import measure_dht

        dht = await measure_dht()
        print("DHT across 5 nodes: " + ", ".join(f"{k} {v:.2f}" for k, v in dht.items()))
        summary["dht"] = {k: round(v, 3) for k, v in dht.items()}
    print(f"targets: throughput_ratio_16 >= 0.80 (got {summary['throughput_ratio_16']}), "
          f"p50_ratio_1 <= 1.30 (got {summary['p50_ratio_1']})")
    print(json.dumps(summary))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=["raw", "ours", "roles"], help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-dht", action="store_true", help="skip the DHT figures")
    args = parser.parse_args()
    if args.serve:
        run_server(args.serve)
    else:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        asyncio.run(main(args.seconds, args.rounds, not args.no_dht))
