"""`KademliaDiscovery`: the `Discovery` interface on a Kademlia DHT node.

    async with KademliaDiscovery(identity=ident, mesh=mesh, port=0, seeds=["10.0.0.5:7400"]) as dht:
        await dht.announce("inferswarm/auth/v1", service="auth", endpoint="tcp://10.0.0.7:5555", version="1.0")
        providers = await dht.lookup("inferswarm/auth/v1")

Lifecycle: `start` binds the UDP socket, tries the seeds (and the saved
neighbours) once, and starts three background loops -- staying connected
(bootstrap retries with exponential backoff, also when the routing table
empties), liveness pings with storage expiry, and saving the neighbours
file. A seed that is down does not fail `start`. `close` undoes it all in
reverse (one `AsyncExitStack`).
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import structlog
from nacl.exceptions import CryptoError

from shared.dht.bootstrap import Backoff, NeighbourFile, parse_seed, resolve_seeds
from shared.dht.cache import LookupCache
from shared.dht.config import DHTConfig
from shared.dht.interface import Provider
from shared.dht.record import InvalidRecord, RecordVerifier, peek, sign_record, topic_key, wall_ms
from shared.dht.server import DHTServer
from shared.errors import InvalidParams, NoProviders, Timeout, Unavailable
from shared.identity import MemberCredential, MeshCredential, MeshId, NodeIdentity
from shared.tasks import Background

__all__ = ["KademliaDiscovery", "select_providers"]

log = structlog.get_logger(__name__)


def select_providers(verifier: RecordVerifier, topic: str, blobs: Iterable[bytes]) -> list[Provider]:
    """The live providers among unverified `blobs`, sorted by node key.

    Per node, the newest record that verifies wins, so a forged record with a
    higher seq cannot hide a real one; a winning withdrawal hides the node.
    """
    candidates: defaultdict[bytes, list[tuple[int, bytes]]] = defaultdict(list)
    for blob in set(blobs):
        try:
            node_key, seq = peek(blob, verifier.max_size)
        except InvalidRecord:
            continue
        candidates[node_key].append((seq, blob))
    providers = []
    for versions in candidates.values():
        for _, blob in sorted(versions, reverse=True):
            try:
                record = verifier.verify(blob, topic=topic)
                if not record.withdrawn:
                    providers.append(record.to_provider())
            except (InvalidRecord, CryptoError):
                continue
            break
    return sorted(providers, key=lambda p: (p.node_key, p.endpoint))


class KademliaDiscovery:
    """A DHT node that announces, withdraws and looks up signed provider records.

    `config` holds every size and timing (`DHTConfig`); any of its fields may
    also be passed as a keyword, e.g. `KademliaDiscovery(..., rpc_timeout=0.3)`.
    `port=0` picks a free port; `address` is then the "host:port" other nodes
    use as a seed. `read_only=True` makes a client node (BEP 43, see
    PROTOCOL.md): it looks up, never announces, answers nobody and enters no
    routing table -- what a short-lived process (a CLI call) must be.
    `neighbours_path` is a JSON file of known peers, read as extra seeds on
    start and rewritten periodically and on close.
    """

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        mesh: MeshCredential | MemberCredential | MeshId,
        host: str = "127.0.0.1",
        port: int = 0,
        seeds: Iterable[str] = (),
        neighbours_path: str | os.PathLike[str] | None = None,
        config: DHTConfig | None = None,
        **overrides: Any,
    ) -> None:
        self.config = replace(config or DHTConfig(), **overrides)
        self.identity = identity
        self._cert = mesh.certify(identity.public_key)
        self.verifier = RecordVerifier(
            mesh.mesh_id,
            max_size=self.config.max_record_size,
            max_ttl=self.config.max_ttl,
            clock_skew=self.config.clock_skew,
        )
        self._host, self._port = host, port
        self._seeds = list(seeds)
        for seed in self._seeds:
            parse_seed(seed)  # a typo in a seed fails now, not silently later
        self._neighbours = NeighbourFile(neighbours_path) if neighbours_path else None
        self._server = DHTServer(identity.node_id, self.verifier, self.config)
        self._cache = LookupCache(self.config.cache_ttl, self.config.cache_size, stale=self.config.cache_stale)
        self._refreshing: dict[str, asyncio.Task[None]] = {}  #: topic -> its background crawl
        self._last_seq = 0
        self._stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"KademliaDiscovery({self.identity!r}, port={self._port})"

    @property
    def port(self) -> int:
        """The bound UDP port (after `start`)."""
        return self._server.address[1]

    @property
    def address(self) -> str:
        """The bound "host:port", usable as another node's seed."""
        ip, port = self._server.address
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    @property
    def joined(self) -> bool:
        """True once this node knows at least one other node of the mesh."""
        return self._server.has_contacts()

    @property
    def server(self) -> DHTServer:
        """The underlying DHT node (routing table, storage, protocol)."""
        return self._server

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> KademliaDiscovery:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen, try to join once, start the background loops."""
        async with AsyncExitStack() as stack:
            await self._server.listen(self._port, self._host)
            stack.callback(self._server.stop)
            if self._neighbours is not None:
                stack.callback(self._save_neighbours)
            await self._join()
            loops = Background()
            stack.push_async_callback(loops.stop)
            stack.push_async_callback(self._stop_refreshing)
            for loop in (self._stay_connected, self._maintain, self._save_regularly):
                loops.start(loop(), name=f"dht.{loop.__name__}")
            self._port = self.port
            log.info("dht.started", address=self.address, node_id=self.identity.node_id.hex())
            self._stack = stack.pop_all()

    async def close(self) -> None:
        """Stop the loops, save the neighbours, close the socket. No withdrawal."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
            log.info("dht.stopped", address=f"{self._host}:{self._port}")

    # -- Discovery ----------------------------------------------------------------

    async def announce(
        self,
        topic: str,
        *,
        service: str,
        endpoint: str,
        version: str,
        load: Mapping[str, Any] | None = None,
        ttl: float | None = None,
    ) -> None:
        """Publish this node's signed record for `topic`, living `ttl` seconds.

        Raises `InvalidParams` for a bad field or ttl, `Unavailable` when no
        node (this one included) accepted the record.
        """
        self._require_started()
        ttl = self.config.ttl if ttl is None else ttl
        if not (isinstance(ttl, (int, float)) and 0 < ttl <= self.config.max_ttl):
            raise InvalidParams(f"ttl must be within (0, {self.config.max_ttl}], got {ttl!r}")
        await self._publish(topic, service=service, endpoint=endpoint, version=version, load=load, ttl=ttl)

    async def withdraw(self, topic: str) -> None:
        """Publish a withdrawal (ttl 0): this node's record of `topic` is gone at once."""
        self._require_started()
        await self._publish(topic, service="", endpoint="", version="", load=None, ttl=0)

    async def lookup(self, topic: str, *, timeout: float | None = None) -> list[Provider]:
        """Every live, verified provider of `topic`; `NoProviders` when there is none.

        With `timeout`, the crawl stops after that many seconds and what it
        found by then is the answer; `Timeout` if that is nothing and the time
        ran out (rather than `NoProviders`, which would claim more than we know).
        """
        self._require_started()
        providers = self._cache.get(topic)
        if providers is None and (providers := self._cache.stale(topic)) is not None:
            self._refresh(topic)  # answered now; the crawl runs for the next caller
        if providers is None:
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            blobs = await self._server.find_records(topic_key(topic), deadline)
            providers = select_providers(self.verifier, topic, blobs)
            self._cache.put(topic, providers)
            if not providers and deadline is not None and loop.time() >= deadline:
                raise Timeout(f"no provider of {topic!r} found within {timeout:.3g} s", {"topic": topic})
        if not providers:
            raise NoProviders(f"no live provider of {topic!r}", {"topic": topic})
        return providers

    def forget(self, topic: str) -> None:
        """Drop the cached lookup of `topic` (a provider of it failed)."""
        self._cache.drop(topic)

    def _refresh(self, topic: str) -> None:
        """Crawl for `topic` in the background, once at a time per topic: a stale answer
        was given, the cache gets the fresh one (or loses the entry when none is found)."""
        if topic in self._refreshing:
            return
        task = asyncio.get_running_loop().create_task(self._recrawl(topic), name=f"dht.refresh {topic}")
        self._refreshing[topic] = task
        task.add_done_callback(lambda _: self._refreshing.pop(topic, None))

    async def _recrawl(self, topic: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            blobs = await self._server.find_records(topic_key(topic), loop.time() + self.config.rpc_timeout * 4)
        except Exception as exc:  # the cached answer stands until it is too old
            log.debug("dht.refresh_failed", topic=topic, error=repr(exc))
            return
        providers = select_providers(self.verifier, topic, blobs)
        if providers:
            self._cache.put(topic, providers)
        else:
            self._cache.drop(topic)  # gone: the next caller crawls and learns it

    async def _stop_refreshing(self) -> None:
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _require_started(self) -> None:
        if self._stack is None:
            raise Unavailable("the DHT node is not started (use `async with` or `start()`)")

    async def _publish(self, topic: str, **fields: Any) -> None:
        if self.config.read_only:
            raise InvalidParams("a read-only DHT node cannot publish records")
        if not isinstance(topic, str) or not topic:
            raise InvalidParams("a topic must be a non-empty string")
        self._last_seq = max(wall_ms(), self._last_seq + 1)
        blob = sign_record(self.identity, self._cert, topic=topic, seq=self._last_seq, **fields)
        try:
            record = self.verifier.verify(blob, key=topic_key(topic))
        except InvalidRecord as exc:  # e.g. a record over max_record_size
            raise InvalidParams(f"cannot publish on {topic!r}: {exc}") from None
        self._cache.drop(topic)
        stored = await self._server.store_record(topic_key(topic), record)
        self._cache.drop(topic)  # a lookup may have raced with the store
        if not stored:
            raise Unavailable(f"no DHT node accepted the record for {topic!r}", {"topic": topic})

    # -- joining and upkeep -------------------------------------------------------

    async def _join(self) -> bool:
        """One bootstrap attempt from the seeds and saved neighbours."""
        saved = self._neighbours.load() if self._neighbours is not None else []
        ipv6 = ":" in self._server.address[0]
        addrs = await resolve_seeds(self._seeds + saved, ipv6=ipv6, timeout=self.config.resolve_timeout)
        addrs = [addr for addr in addrs if addr != self._server.address]
        if not addrs:
            return False
        found = await self._server.bootstrap(addrs)
        joined = self._server.has_contacts()
        log.info("dht.bootstrap", seeds=len(addrs), found=len(found), joined=joined)
        return joined

    async def _stay_connected(self) -> None:
        # Runs until cancelled; every iteration sleeps, at most backoff_max.
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        while True:
            if self._server.has_contacts():
                backoff.reset()
                await asyncio.sleep(self.config.ping_interval)
            elif await _guarded(self._join) is True:
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next())

    async def _maintain(self) -> None:
        # Runs until cancelled; each round is bounded by one rpc_timeout.
        while True:
            await asyncio.sleep(self.config.ping_interval)
            await _guarded(self._server.protocol.check_liveness)
            self._server.storage.expire()

    async def _save_regularly(self) -> None:
        if self._neighbours is None:
            return
        while True:
            await asyncio.sleep(self.config.save_interval)
            self._save_neighbours()

    def _save_neighbours(self) -> None:
        if self._neighbours is None:
            return
        try:
            self._neighbours.save(self.identity.node_id, self._server.bootstrappable_neighbors())
        except OSError as exc:
            log.warning("dht.neighbours_not_saved", path=str(self._neighbours.path), error=str(exc))


async def _guarded(step: Callable[[], Awaitable[Any]]) -> Any:
    """Run one step of a background loop; a failure is logged, never fatal."""
    try:
        return await step()
    except Exception:
        log.exception("dht.background_step_failed", step=getattr(step, "__name__", repr(step)))
        return None

