"""Where a node finds its first peers: seeds, saved neighbours, backoff.

Seeds are "host:port" strings (hostnames are resolved; kademlia accepts IPs
only). The neighbours file is JSON, written atomically, so a node restarted
without seeds (or whose seeds are down) can rejoin through the peers it knew.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import socket
from pathlib import Path
from typing import cast

import structlog

from shared.dht.protocol import Address

__all__ = ["parse_seed", "resolve_seeds", "NeighbourFile", "Backoff"]

log = structlog.get_logger(__name__)

_MAX_NEIGHBOURS = 256  # entries read from a neighbours file


def parse_seed(text: str) -> tuple[str, int]:
    """`(host, port)` of "host:port" or "[v6addr]:port"; ValueError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a DHT seed must read host:port, got {text!r}")
    return host, int(port)


async def _resolve(host: str, port: int, family: int, timeout: float) -> list[Address]:
    try:
        ipaddress.ip_address(host)
        return [(host, port)]  # an IP literal needs no resolver thread
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM), timeout
        )
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("dht.seed_unresolved", seed=f"{host}:{port}", error=str(exc) or type(exc).__name__)
        return []
    return [(cast(str, info[4][0]), cast(int, info[4][1])) for info in infos]


async def resolve_seeds(seeds: list[str], *, ipv6: bool = False, timeout: float = 5.0) -> list[Address]:
    """The distinct `(ip, port)` of every seed that parses and resolves."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    parsed = []
    for seed in seeds:
        try:
            parsed.append(parse_seed(seed))
        except ValueError as exc:
            log.warning("dht.seed_invalid", error=str(exc))
    resolved = await asyncio.gather(*(_resolve(host, port, family, timeout) for host, port in parsed))
    return list(dict.fromkeys(addr for addrs in resolved for addr in addrs))


class NeighbourFile:
    """The JSON file of known neighbours, `{"node_id": hex, "neighbours": ["ip:port", ...]}`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> list[str]:
        """The saved "ip:port" strings; none when the file is missing or unreadable."""
        try:
            data = json.loads(self.path.read_text())
            neighbours = data["neighbours"]
            if not isinstance(neighbours, list):
                raise TypeError("neighbours is not a list")
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("dht.neighbours_unreadable", path=str(self.path), error=str(exc))
            return []
        return [entry for entry in neighbours[:_MAX_NEIGHBOURS] if isinstance(entry, str)]

    def save(self, node_id: bytes, neighbours: list[Address]) -> None:
        """Write the neighbours atomically; an empty list keeps the old file."""
        if not neighbours:
            return
        entries = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in neighbours]
        text = json.dumps({"node_id": node_id.hex(), "neighbours": entries}, indent=1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, self.path)


class Backoff:
    """Exponential backoff with +-`jitter` randomisation."""

    def __init__(self, initial: float, maximum: float, jitter: float = 0.2) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._next = initial

    def next(self) -> float:
        """The next delay; each call doubles the following one, up to `maximum`."""
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self._next = self.initial
