"""DHT latency on loopback: announce and lookup p50/p99 over 5 nodes.

    python bench/dht.py [rounds]

Prints the figures, then one last line of JSON. Lookups bypass the cache
(`cache_ttl=0`), so each one is a full crawl of the k closest nodes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import structlog

from shared.dht import DHTConfig, KademliaDiscovery
from shared.identity import MeshCredential, NodeIdentity

__all__ = ["measure_dht"]

NODES = 5
PROVIDERS = 3
TOPIC = "inferswarm/bench/v1"


def _percentiles(samples_ms: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return round(statistics.median(samples_ms), 3), round(cuts[98], 3)


async def _timed(step: Any) -> float:
    start = time.perf_counter()
    await step
    return (time.perf_counter() - start) * 1000


async def measure_dht(rounds: int = 200) -> dict[str, Any]:
    """Start 5 nodes on 127.0.0.1; time `rounds` announces and `rounds` lookups.

    Returns `{"announce_p50_ms", "announce_p99_ms", "lookup_p50_ms",
    "lookup_p99_ms", "nodes", "providers", "rounds"}`.
    """
    mesh = MeshCredential(MeshCredential.new_secret())
    config = DHTConfig(cache_ttl=0, rpc_timeout=0.5)
    async with AsyncExitStack() as stack:
        nodes: list[KademliaDiscovery] = []
        for _ in range(NODES):
            seeds = [nodes[0].address] if nodes else []
            node = KademliaDiscovery(identity=NodeIdentity.generate(), mesh=mesh, seeds=seeds, config=config)
            nodes.append(await stack.enter_async_context(node))
        announce_ms, lookup_ms = [], []
        for i in range(rounds):
            provider = nodes[i % PROVIDERS]
            endpoint = f"tcp://127.0.0.1:{6000 + i % PROVIDERS}"
            step = provider.announce(TOPIC, service="bench", endpoint=endpoint, version="1", load={"i": i})
            announce_ms.append(await _timed(step))
            lookup_ms.append(await _timed(nodes[(i + 1) % NODES].lookup(TOPIC)))
        found = len(await nodes[-1].lookup(TOPIC))
    announce = _percentiles(announce_ms)
    lookup = _percentiles(lookup_ms)
    return {
        "announce_p50_ms": announce[0],
        "announce_p99_ms": announce[1],
        "lookup_p50_ms": lookup[0],
        "lookup_p99_ms": lookup[1],
        "nodes": NODES,
        "providers": found,
        "rounds": rounds,
    }


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    result = asyncio.run(measure_dht(rounds))
    print(f"{result['nodes']} nodes on loopback, {result['providers']} providers, {rounds} rounds")
    print(f"announce  p50 {result['announce_p50_ms']:.3f} ms   p99 {result['announce_p99_ms']:.3f} ms")
    print(f"lookup    p50 {result['lookup_p50_ms']:.3f} ms   p99 {result['lookup_p99_ms']:.3f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
